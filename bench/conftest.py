"""peft_fast vs Hugging Face PEFT benchmarks: run with `pytest bench/` (not `python -m pytest`, which puts the repo
root on sys.path, where the top-level `kernels/` directory shadows Hugging Face's `kernels` package).

Each test runs peft_fast and its baseline in one process and records both; the session ends with a table.
"""
import os
import sys

import pytest
import torch

# Tests import the helpers as a plain module; make that work under --import-mode=importlib too.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchutil  # noqa: E402

if not benchutil.ON_GPU:
    # Shared CPUs (CI, dev boxes running tests beside us) make torch's spinning OpenMP threads stall for whole
    # scheduler slices: a 0.1 ms op then reads 70 ms. One thread gives both sides stable, comparable numbers.
    torch.set_num_threads(int(os.environ.get("PEFT_FAST_BENCH_THREADS", "1")))


def pytest_report_header(config):
    where = torch.cuda.get_device_name() if benchutil.ON_GPU else "cpu (small sizes; GPU runs use Llama-8B shapes)"
    return [f"peft_fast bench: device {where}, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, PEFT_FAST_BACKEND={os.environ.get('PEFT_FAST_BACKEND', 'auto')}"]


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables, so ours is the last thing printed
def pytest_terminal_summary(terminalreporter):
    rows = benchutil.RESULTS
    if not rows:
        return
    tr = terminalreporter
    tr.section("peft_fast vs PEFT (median of interleaved rounds; ratio = peft_fast / baseline, < 1 is faster)")
    for line in benchutil.format_table(rows):
        tr.write_line(line)
    if not benchutil.ON_GPU:
        tr.write_line(f"note: {benchutil.MEMORY_NOTE}")

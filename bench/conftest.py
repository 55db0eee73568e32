"""peft_fast vs its baselines: run with `pytest bench/` (not `python -m pytest`, which puts the repo root on
sys.path, where the top-level `kernels/` directory shadows Hugging Face's `kernels` package).

Each benchmark runs as two pytest-benchmark benchmarks in one group, `[...-peft_fast]` and `[...-baseline]`, so
pytest-benchmark prints one table per group with both side by side. The session then ends with our summary
(peft_fast / baseline ratios from interleaved rounds, see benchutil) and writes it to bench/results/latest.json.

Options (README "Benchmarks"):
  --pf-json PATH   where the run's rows go (default bench/results/latest.json)
  --pf-charts DIR  also draw PNG charts into DIR: ratio per benchmark, peak memory, multi-adapter tokens/s
                   (needs matplotlib, an optional extra; replaces --benchmark-histogram, which needs pygal)
"""
import datetime
import importlib.util
import os
import sys

import pytest
import torch

# Tests import the helpers as plain modules; make that work under --import-mode=importlib too.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchreport  # noqa: E402
import benchutil  # noqa: E402

if not benchutil.ON_GPU:
    # Shared CPUs (CI, dev boxes running tests beside us) make torch's spinning OpenMP threads stall for whole
    # scheduler slices: a 0.1 ms op then reads 70 ms. One thread gives both sides stable, comparable numbers.
    torch.set_num_threads(int(os.environ.get("PEFT_FAST_BENCH_THREADS", "1")))

_WRITTEN: list[str] = []  # what pytest_sessionfinish wrote (or why not), printed at the end of the summary


def pytest_addoption(parser):
    group = parser.getgroup("peft_fast bench")
    group.addoption("--pf-json", metavar="PATH", default=str(benchreport.LATEST),
                    help="write the run's rows (medians, ratios, peak memory, device, versions) to PATH "
                         "(default: bench/results/latest.json)")
    group.addoption("--pf-charts", metavar="DIR", default=None,
                    help="draw PNG charts into DIR: ratio per benchmark, peak memory, multi-adapter "
                         "tokens/s. Needs matplotlib (optional extra)")


def pytest_configure(config):
    # Fail before an hour of benchmarks, not after them.
    if config.getoption("pf_charts"):
        try:  # matplotlib is an optional extra, imported only for this flag
            benchreport.require_matplotlib()
        except benchreport.ReportError as e:
            raise pytest.UsageError(f"--pf-charts: {e}") from None
    if config.getoption("benchmark_histogram", None) and importlib.util.find_spec("pygal") is None:
        raise pytest.UsageError("--benchmark-histogram needs pygal, which is not installed; --pf-charts DIR draws "
                                "peft_fast's charts (ratios, memory, tokens/s) with matplotlib instead")


def pytest_report_header(config):
    where = torch.cuda.get_device_name() if benchutil.ON_GPU else "cpu (small sizes; GPU runs use Llama-8B shapes)"
    return [f"peft_fast bench: device {where}, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, PEFT_FAST_BACKEND={os.environ.get('PEFT_FAST_BACKEND', 'auto')}"]


def _fixture_medians(config, rows):
    """pytest-benchmark's own median of each side, next to the interleaved ones (a cross-check, not the ratio)."""
    bs = getattr(config, "_benchmarksession", None)  # absent under -p no:benchmark
    by_label = {r["label"]: r for r in rows}
    for b in getattr(bs, "benchmarks", []):
        info = getattr(b, "extra_info", {}) or {}
        median = getattr(getattr(b, "stats", None), "median", None)
        if info.get("label") in by_label and info.get("impl") and median is not None:
            by_label[info["label"]][f"fixture_{info['impl']}_median_ms"] = median * 1e3


def pytest_sessionfinish(session):
    # Runs after pytest-benchmark's own sessionfinish (a hook wrapper), so its stats are computed by now.
    rows, config = benchutil.RESULTS, session.config
    if not rows:
        return
    _fixture_medians(config, rows)
    meta = {"device": torch.cuda.get_device_name() if benchutil.ON_GPU else "cpu",
            "threads": None if benchutil.ON_GPU else torch.get_num_threads(),
            "command": "pytest " + " ".join(config.invocation_params.args),
            "versions": benchreport.versions()}
    try:
        _WRITTEN.append(f"rows: {benchreport.write_json(config.getoption('pf_json'), rows, **meta)}")
        if config.getoption("pf_charts"):
            title = benchreport.chart_title({**meta, "created": datetime.date.today().isoformat()})
            _WRITTEN.extend(benchreport.draw_charts(rows, config.getoption("pf_charts"), title))
    except Exception as e:  # asked-for output that is missing fails the run, with one line rather than a traceback
        _WRITTEN.append(f"ERROR writing the report: {type(e).__name__}: {e}")
        session.exitstatus = session.exitstatus or pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables, so ours is the last thing printed
def pytest_terminal_summary(terminalreporter):
    rows = benchutil.RESULTS
    if not rows:
        return
    tr = terminalreporter
    tr.section("peft_fast vs baseline: medians of interleaved rounds; ratio = peft_fast / baseline, < 1 is faster")
    for line in benchreport.table(rows):
        tr.write_line(line)
    if not benchutil.ON_GPU:
        tr.write_line(f"note: {benchreport.MEMORY_NOTE}")
    for line in _WRITTEN:
        tr.write_line(line, red=line.startswith("ERROR"))

"""Checks of what a bench run leaves behind (tests/ holds the library's tests; these are the harness's).

- latest.json round-trips, and every results format bench/compare.py accepts loads to the same rows;
- the charts are PNG files, the memory chart is left out (and says why) when no row has GPU memory;
- bench/compare.py passes an unchanged run, fails a regressed ratio with a readable summary and exit 1, and
  reports unreadable input with exit 2 and one line, never a traceback;
- --pf-charts without matplotlib, and --benchmark-histogram without pygal, stop at startup with a UsageError;
- end to end: a child `pytest` on one small real benchmark writes latest.json and the charts where it is told;
- gpu_report.py turns what gpu_check.sh leaves (junit xml, rc files, skip markers, benchmark rows, the memory and
  host scripts' JSON) into the report and the one summary table a GPU run ends with.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import benchreport
import compare
from test_bench_lora_linear import SHAPES

BENCH = Path(__file__).resolve().parent
PNG = b"\x89PNG\r\n\x1a\n"


def _row(label, ratio, **kw):
    return {"label": label, "baseline": "peft 0.0 test", "device": "cpu", "peft_fast_ms": ratio, "peft_ms": 1.0,
            "ratio": ratio, "peft_fast_peak_mib": None, "peft_peak_mib": None, "mem_ratio": None, "rel_err": 0.0,
            **kw}


CPU_ROWS = [_row("lora decode M=1", 0.8), _row("train step", 1.05)] + [
    _row(f"multi_lora llama decode 32x1 adapters={n}", 0.9, n_adapters=n, tokens_per_s=1000 / n,
         peft_tokens_per_s=900 / n, base_tokens_per_s=2000.0) for n in (1, 4, 16)]
GPU_ROWS = [_row("lora fwd+bwd", 0.7, device="gpu", peft_fast_peak_mib=65.0, peft_peak_mib=256.0, mem_ratio=0.25),
            _row("lora decode", 1.3, device="gpu", peft_fast_peak_mib=0.1, peft_peak_mib=0.0, mem_ratio=None)]


def test_latest_json_round_trip(tmp_path):
    path = benchreport.write_json(tmp_path / "sub" / "latest.json", CPU_ROWS, device="cpu", versions={"torch": "x"})
    meta, rows = benchreport.load(path)
    assert rows == CPU_ROWS
    assert meta["device"] == "cpu" and meta["schema"] == benchreport.SCHEMA and "ratio" in meta["keys"]
    assert not list(tmp_path.glob("sub/*.tmp"))


def test_every_results_format_loads(tmp_path):
    # pytest-benchmark's JSON: both sides carry the row; it must count once
    pb = {"benchmarks": [{"extra_info": {**r, "impl": impl}} for r in CPU_ROWS for impl in ("peft_fast", "baseline")]}
    (tmp_path / "pb.json").write_text(json.dumps(pb))
    (tmp_path / "gpu_report.json").write_text(json.dumps({"card": "gpu", "benchmarks": GPU_ROWS}))
    # bench_rows.jsonl, as a run killed mid-write leaves it: the cut last line is dropped
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CPU_ROWS) + '{"label": "cut')
    (tmp_path / "one.jsonl").write_text(json.dumps(CPU_ROWS[0]) + "\n")
    assert benchreport.load(tmp_path / "one.jsonl")[1] == CPU_ROWS[:1]
    assert benchreport.load(tmp_path / "pb.json")[1] == CPU_ROWS
    assert benchreport.load(tmp_path / "rows.jsonl")[1] == CPU_ROWS
    meta, rows = benchreport.load(tmp_path / "gpu_report.json")
    assert rows == GPU_ROWS and meta["device"] == "gpu"


def test_table_lists_every_row_with_its_ratio():
    lines = benchreport.table(CPU_ROWS + GPU_ROWS)
    for r in CPU_ROWS + GPU_ROWS:
        assert any(line.startswith(r["label"]) and f"{r['ratio']:.2f}" in line for line in lines)
    assert any("65/256 (0.25)" in line for line in lines)


def test_charts_are_png(tmp_path):
    pytest.importorskip("matplotlib")
    lines = benchreport.draw_charts(CPU_ROWS + GPU_ROWS, tmp_path, "test title")
    for name in ("ratio.png", "memory.png", "multi_lora_tokens.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG, name
        assert f"chart: {tmp_path / name}" in lines


def test_memory_chart_skipped_on_cpu_rows(tmp_path):
    pytest.importorskip("matplotlib")
    lines = benchreport.draw_charts(CPU_ROWS[:2], tmp_path, "")
    assert (tmp_path / "ratio.png").exists() and not (tmp_path / "memory.png").exists()
    assert any("memory.png not drawn" in line and "no row has peak memory" in line for line in lines)
    assert any("multi_lora_tokens.png not drawn" in line for line in lines)


def test_compare_pass_regression_and_bad_input(tmp_path, capsys):
    saved = benchreport.write_json(tmp_path / "saved.json", CPU_ROWS, device="cpu")
    worse = [dict(r) for r in CPU_ROWS]
    worse[0]["ratio"] *= 1.25  # 25% worse than saved: over the 10% threshold
    worse[1]["ratio"] *= 1.05  # 5% worse: within it
    new = benchreport.write_json(tmp_path / "new.json", worse, device="cpu")

    assert compare.main([str(saved), str(saved)]) == 0
    assert "bench compare: PASS" in capsys.readouterr().out

    assert compare.main([str(saved), str(new)]) == 1
    out = capsys.readouterr().out
    assert "lora decode M=1" in out and "+25.0%  REGRESSED" in out
    assert any(line.startswith("train step") and line.endswith("ok") for line in out.splitlines())
    assert "FAIL: 1 benchmark(s) regressed" in out
    assert compare.main([str(saved), str(new), "--threshold", "0.3"]) == 0  # the threshold is the judge

    assert compare.main([str(saved), str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "Traceback" not in err


class _Config:
    def __init__(self, **options):
        self.options = options

    def getoption(self, name, default=None):
        return self.options.get(name, default)


def _bench_conftest(request):
    return next(p for p in request.config.pluginmanager.get_plugins()
                if getattr(p, "__file__", None) == str(BENCH / "conftest.py"))


def test_charts_flag_without_matplotlib_is_a_usage_error(request, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(pytest.UsageError, match="--pf-charts: charts need matplotlib"):
        _bench_conftest(request).pytest_configure(_Config(pf_charts="charts"))


def test_histogram_without_pygal_is_a_usage_error(request):
    if importlib.util.find_spec("pygal") is not None:
        pytest.skip("pygal is installed here: --benchmark-histogram works")
    with pytest.raises(pytest.UsageError, match="--pf-charts"):
        _bench_conftest(request).pytest_configure(_Config(benchmark_histogram=["hist"]))


def test_a_run_writes_latest_json_and_charts(tmp_path):
    """One small real benchmark, both sides, in a child pytest told where to write."""
    case = f"{SHAPES[0][0]}x{SHAPES[0][1]}-1"
    ids = [f"{BENCH / 'test_bench_lora_linear.py'}::test_lora_linear_decode[{case}-{impl}]"
           for impl in ("peft_fast", "baseline")]
    charts = importlib.util.find_spec("matplotlib") is not None
    cmd = [sys.executable, "-m", "pytest", *ids, "-q", "-p", "no:cacheprovider", "--pf-json",
           str(tmp_path / "latest.json"), "--benchmark-max-time=0.05", "--benchmark-min-rounds=3"]
    if charts:
        cmd += ["--pf-charts", str(tmp_path / "charts")]
    env = {k: v for k, v in os.environ.items() if k != "PEFT_FAST_BENCH_ROWS"}  # not into gpu_check's rows
    env["PYTHONSAFEPATH"] = "1"  # and run from tmp_path: the repo root on sys.path shadows `kernels`
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "peft_fast vs baseline" in res.stdout and f"rows: {tmp_path / 'latest.json'}" in res.stdout
    meta, rows = benchreport.load(tmp_path / "latest.json")
    assert [r["benchmark"] for r in rows] == [f"bench/test_bench_lora_linear.py::test_lora_linear_decode[{case}]"]
    row = rows[0]
    assert row["ratio"] == pytest.approx(row["peft_fast_ms"] / row["peft_ms"])
    assert row["fixture_peft_fast_median_ms"] > 0 and row["fixture_baseline_median_ms"] > 0
    assert meta["versions"]["peft"] and meta["device"]
    if charts:
        assert (tmp_path / "charts" / "ratio.png").read_bytes()[:8] == PNG


def test_gpu_report_summarizes_a_check_folder(tmp_path, monkeypatch, capsys):
    """The table a GPU session reads last: a passed stage with a failure, a timed-out one, one left out by
    GPU_CHECK_STAGES, benchmark rows, memory rows with DoRA's ratio to LoRA, host rows; the JSON report goes where
    RESULTS_DIR says."""
    spec = importlib.util.spec_from_file_location("gpu_report", BENCH / "gpu_report.py")
    gpu_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_report)
    logs, results = tmp_path / "logs", tmp_path / "results"
    logs.mkdir()
    (logs / "kernels.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="t" name="ok"/><testcase classname="t" name="bad"><failure message="x"/></testcase>'
        '<testcase classname="t" name="gpu_only"><skipped message="needs two GPUs"/></testcase>'
        '</testsuite></testsuites>')
    (logs / "kernels.rc").write_text("1 40")
    (logs / "fused.rc").write_text("124 100")
    (logs / "serving.skipped").write_text("")
    (logs / "memory.rc").write_text("124 50")
    (logs / "host.rc").write_text("0 12")
    (logs / "profile.skipped").write_text("")
    (logs / "bench_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GPU_ROWS))
    memory = dict(shape="1.1B", variant="peft_fast", Total=100.0, Parameter=50.0, Optstate=10.0, Activation=30.0,
                  Temp=10.0)
    dora = dict(memory, variant="peft_fast dora", Total=104.0, Activation=34.0)
    (logs / "memory.json").write_text(json.dumps({"rows": [memory, dora]}))
    (logs / "host.json").write_text(json.dumps({"rows": [dict(case="lora fwd+bwd", peft_fast_us=70.0,
                                                               peft_fast_jit_us=110.0, peft_us=90.0,
                                                               peft_fast_launches=4)]}))
    monkeypatch.setattr(gpu_report, "RESULTS_DIR", results)
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(sys, "argv", ["gpu_report.py", str(logs), "--seconds", "500"])
    gpu_report.main()
    text = capsys.readouterr().out
    assert "tests kernels: 1 passed, 1 failed, 0 errors, 1 skipped" in text and "FAILED t::bad" in text
    assert "tests fused: no junit xml" in text and "(TIMED OUT)" in text
    assert "tests serving: skipped" in text
    assert "script memory: exit status 124 (see stages.log) in 50 s (TIMED OUT)" in text
    assert "script host: ok in 12 s" in text and "script profile: skipped" in text
    assert "1.1B   peft_fast  DoRA/LoRA peak 1.040 (activations and temporaries 1.100)" in text
    assert "1.1B   peft_fast" in text and "70.0 |   110.0 |    90.0  (4 launches)" in text  # memory, host rows
    assert all(r["label"] in text for r in GPU_ROWS)  # the benchmark table
    report = json.loads(next(results.glob("gpu_report_*.json")).read_text())
    assert report["tests"]["kernels"]["failed"] == ["t::bad"] and report["seconds"] == 500


def test_gpu_report_for_a_remote_run(tmp_path, monkeypatch, capsys):
    """With $OUT (a remote machine returns at most 8 files from it): the report and one archive of the logs;
    the stage lines come after the table (a cut output keeps its tail); a junit xml cut off by a hard kill is
    reported, not a crash."""
    spec = importlib.util.spec_from_file_location("gpu_report", BENCH / "gpu_report.py")
    gpu_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_report)
    logs, results, out = tmp_path / "logs", tmp_path / "results", tmp_path / "out"
    logs.mkdir()
    out.mkdir()
    (logs / "kernels.xml").write_text('<testsuites><testsuite tests="3" failures="0"')  # cut off
    (logs / "kernels.rc").write_text("137 80")
    (logs / "kernels.log").write_text("...")
    (logs / "bench_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GPU_ROWS))
    (out / "memory.json").write_text('{"device": "cuda", "rows": [{"shape": "1b", "vari')  # cut off too
    monkeypatch.setattr(gpu_report, "RESULTS_DIR", results)
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setattr(sys, "argv", ["gpu_report.py", str(logs), "--seconds", "500"])
    gpu_report.main()
    text = capsys.readouterr().out
    assert "tests kernels: junit xml cut off" in text
    assert text.index("tests kernels") > max(text.index(r["label"]) for r in GPU_ROWS)
    assert "memory.json is cut off" in text
    assert sorted(p.name for p in out.iterdir()) == ["gpu_report.json", "logs.tar.gz", "memory.json"]
    import tarfile

    with tarfile.open(out / "logs.tar.gz") as tar:
        assert "logs/kernels.log" in tar.getnames()

"""Collect what bench/gpu_check.sh left in its log folder into one JSON report, and print the summary table.

Usage: python3 bench/gpu_report.py LOGDIR [--seconds N]
Reads LOGDIR/{kernels,peft_fast,bench}.{xml,rc}, LOGDIR/bench_rows.jsonl (one row per benchmark, written as it
finished), LOGDIR/bench.json (pytest-benchmark's own stats for each side, peft_fast and baseline) and memory.json
(bench/memory_report.py's rows, in LOGDIR or $OUT).
Writes bench/results/gpu_report_<card>.json, and $OUT/gpu_report.json and $OUT/logs.tar.gz (LOGDIR packed: the
remote machine returns at most 8 files) when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gpu_check.sh sets PYTHONSAFEPATH, which drops it

import benchreport  # noqa: E402

STAGES = ("kernels", "peft_fast", "fused", "moe", "bench", "distributed", "serving")
SCRIPTS = ("memory", "host", "profile")  # stages that run a script: an exit status and a log, no junit xml
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _versions() -> dict:
    out = benchreport.versions()
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except Exception:
        pass
    return out


def _card() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:
        return "unknown"


SKIPPED = {"status": "skipped (not in GPU_CHECK_STAGES, or a 0 s limit)"}


def _rc(logs: Path, name: str) -> dict:
    """What gpu_check.sh's stage() and script() leave: "rc seconds", rc 124/137 when the time limit stopped it."""
    rc_file = logs / f"{name}.rc"
    if not rc_file.exists():
        return {}
    rc, secs = (int(v) for v in rc_file.read_text().split())
    return {"rc": rc, "seconds": secs, "timed_out": rc in (124, 137)}


def _script(logs: Path, name: str) -> dict:
    if (logs / f"{name}.skipped").exists():
        return dict(SKIPPED)
    info = _rc(logs, name)
    if not info:
        return {"status": "did not run"}
    return {"status": "ok" if info["rc"] == 0 else f"exit status {info['rc']} (see stages.log)", **info}


def _stage(logs: Path, name: str) -> dict:
    """Pass/fail counts from the junit xml; rc 124/137 means the stage hit its time limit."""
    if (logs / f"{name}.skipped").exists():
        return dict(SKIPPED)
    info = _rc(logs, name)
    xml = logs / f"{name}.xml"
    if not xml.exists():
        info["status"] = "no junit xml: the stage did not run, timed out or crashed (see its log)"
        return info
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError:  # cut off by the hard kill after the grace period
        info["status"] = "junit xml cut off: the stage was killed mid-write (see its log)"
        return info
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    info.update(counts)
    info["failed"], info["skips"] = [], []
    for case in root.iter("testcase"):
        case_id = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            info["failed"].append(case_id)
        skip = case.find("skipped")
        if skip is not None:
            info["skips"].append(f"{case_id}: {skip.get('message', '')[:300]}")
    return info


def _benchmarks(logs: Path) -> list[dict]:
    rows_file = logs / "bench_rows.jsonl"
    if not rows_file.exists() and os.environ.get("OUT"):  # gpu_check.sh writes rows straight into $OUT
        rows_file = Path(os.environ["OUT"]) / "bench_rows.jsonl"
    rows = benchreport.load(rows_file)[1] if rows_file.exists() else []
    stats = {}
    bench_json = logs / "bench.json"
    if bench_json.exists():
        for b in _json(bench_json).get("benchmarks", []):
            info = b.get("extra_info", {})
            stats[(info.get("label"), info.get("impl", "peft_fast"))] = b["stats"]
    for row in rows:  # pytest-benchmark's view of each side, for cross-checking the interleaved medians
        for impl in ("peft_fast", "baseline"):
            s = stats.get((row["label"], impl))
            if s:
                row[f"fixture_{impl}_median_ms"] = s["median"] * 1e3
                row[f"fixture_{impl}_rounds"] = s["rounds"]
    return rows


def _slug(card: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") or "unknown"


def _summary(report: dict) -> list[str]:
    header = (f"== summary: {report['card']} | torch {report['versions'].get('torch')} | "
              f"triton {report['versions'].get('triton')} | peft {report['versions'].get('peft')} | "
              f"{report.get('seconds', '?')} s")
    return [header] + _tables(report) + ["", header.replace("summary", "stages")] + _stage_lines(report)


def _stage_lines(report: dict) -> list[str]:
    """One line per stage and script, with failures: printed last, where a cut output keeps them."""
    lines = []
    for name, st in report["tests"].items():
        if "tests" in st:
            line = (f"tests {name}: {st['passed']} passed, {st['failures']} failed, {st['errors']} errors, "
                    f"{st['skipped']} skipped")
        else:
            line = f"tests {name}: {st.get('status', 'not run')}"
        if st.get("timed_out"):
            line += " (TIMED OUT)"
        lines.append(line)
        lines += [f"  FAILED {f}" for f in st.get("failed", [])[:10]]
    for name, st in report.get("scripts", {}).items():
        line = f"script {name}: {st['status']}" + (f" in {st['seconds']} s" if "seconds" in st else "")
        lines.append(line + (" (TIMED OUT)" if st.get("timed_out") else ""))
    for s in report["tests"].get("bench", {}).get("skips", []):
        lines.append(f"  skipped: {s.splitlines()[0][:150]}")
    return lines


def _tables(report: dict) -> list[str]:
    lines = []
    if report["benchmarks"]:
        lines += benchreport.table(report["benchmarks"])
    else:
        lines.append("(no benchmark rows: see bench.log)")
    lines.append("ratio = peft_fast / baseline time (< 1: peft_fast faster); MiB = extra peak memory of one call")
    if report.get("memory"):  # bench/memory_report.py: what the training step's peak is made of
        lines += ["", "memory at a training step's peak (MiB): shape, variant, total = parameters + optimizer state + "
                  "activations + temporaries + ..."]
        for r in report["memory"]:
            lines.append(f"  {r['shape']:<6} {r['variant']:<30} total {r['Total']:>9.1f}  params {r['Parameter']:>8.1f}"
                         f"  optstate {r['Optstate']:>7.1f}  activations {r['Activation']:>8.1f}"
                         f"  temp {r['Temp']:>8.1f}  host {r.get('host_mib', 0.0):>7.1f}")
        lines += [f"  {line}" for line in benchreport.dora_ratios(report["memory"])]
    if report.get("host"):  # bench/host_overhead.py --device cuda: host time per layer call, tiny shapes
        lines += ["", "host time per layer call (us): peft_fast (cached launches) | dispatcher on every launch | PEFT"]
        nan = float("nan")
        for r in report["host"]:
            lines.append(f"  {r['case']:<30} {r['peft_fast_us']:>7.1f} | {r.get('peft_fast_jit_us', nan):>7.1f}"
                         f" | {r.get('peft_us', nan):>7.1f}  ({r['peft_fast_launches']} launches)")
    return lines


def _rows(logs: Path, name: str) -> list:
    """The rows of a script's JSON (memory.json, host.json), from the logs or $OUT."""
    for folder in (logs, Path(os.environ["OUT"]) if os.environ.get("OUT") else None):
        if folder is not None and (folder / name).exists():
            return _json(folder / name).get("rows", [])
    return []


def _json(path: Path) -> dict:
    """A JSON file a stage wrote, or {} when a kill cut it off mid-write (the report must still come out)."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        print(f"warning: {path.name} is cut off (a stage was killed while writing it); its rows are left out")
        return {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("logs", type=Path)
    ap.add_argument("--seconds", type=int, default=None)
    args = ap.parse_args()
    card = _card()
    report = {
        "card": card,
        "versions": _versions(),
        "seconds": args.seconds,
        "tests": {name: _stage(args.logs, name) for name in STAGES},
        "scripts": {name: _script(args.logs, name) for name in SCRIPTS},
        "benchmarks": _benchmarks(args.logs),
        "memory": _rows(args.logs, "memory.json"),
        "host": _rows(args.logs, "host.json"),
    }
    text = json.dumps(report, indent=1)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    targets = [RESULTS_DIR / f"gpu_report_{_slug(card)}.json"]
    out = os.environ.get("OUT")
    if out:
        targets.append(Path(out) / "gpu_report.json")
        with tarfile.open(Path(out) / "logs.tar.gz", "w:gz") as tar:
            tar.add(args.logs, arcname="logs")
    for t in targets:
        t.write_text(text)
    print("\n".join(_summary(report)))
    print("report:", ", ".join(str(t) for t in targets))


if __name__ == "__main__":
    main()

"""Collect what bench/gpu_check.sh left in its log folder into one JSON report, and print the summary table.

Usage: python3 bench/gpu_report.py LOGDIR [--seconds N]
Reads LOGDIR/{kernels,peft_fast,bench}.{xml,rc}, LOGDIR/bench_rows.jsonl (one row per benchmark, written as it
finished) and LOGDIR/bench.json (pytest-benchmark's own stats for the peft_fast side).
Writes bench/results/gpu_report_<card>.json, and $OUT/gpu_report.json with the logs when OUT is set.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

STAGES = ("kernels", "peft_fast", "bench")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "triton", "transformers", "peft", "pytest_benchmark", "bitsandbytes", "peft_fast"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as e:  # a missing optional package is a fact worth reporting, not an error
            out[name] = f"unavailable ({type(e).__name__})"
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


def _stage(logs: Path, name: str) -> dict:
    """Pass/fail counts from the junit xml; rc 124/137 means the stage hit its time limit."""
    info: dict = {}
    rc_file = logs / f"{name}.rc"
    if rc_file.exists():
        rc, secs = rc_file.read_text().split()
        info.update(rc=int(rc), seconds=int(secs), timed_out=int(rc) in (124, 137))
    xml = logs / f"{name}.xml"
    if not xml.exists():
        info["status"] = "no junit xml: the stage did not run, timed out or crashed (see its log)"
        return info
    root = ET.parse(xml).getroot()
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
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()] if rows_file.exists() else []
    stats = {}
    bench_json = logs / "bench.json"
    if bench_json.exists():
        for b in json.loads(bench_json.read_text()).get("benchmarks", []):
            stats[b.get("extra_info", {}).get("label")] = b["stats"]
    for row in rows:  # pytest-benchmark's view of the peft_fast side, for cross-checking time_pair's
        s = stats.get(row["label"])
        if s:
            row["fixture_peft_fast_median_ms"] = s["median"] * 1e3
            row["fixture_rounds"] = s["rounds"]
    return rows


def _slug(card: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") or "unknown"


def _summary(report: dict) -> list[str]:
    lines = [f"== summary: {report['card']} | torch {report['versions'].get('torch')} | "
             f"triton {report['versions'].get('triton')} | peft {report['versions'].get('peft')} | "
             f"{report.get('seconds', '?')} s"]
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
    for s in report["tests"].get("bench", {}).get("skips", []):
        lines.append(f"  skipped: {s.splitlines()[0][:150]}")
    head = f"{'benchmark':<58} {'peft_fast ms':>12} {'peft ms':>10} {'ratio':>6} {'MiB fast/peft':>16} {'err':>8}"
    lines += ["", head, "-" * len(head)]
    for r in report["benchmarks"]:
        mem = ""
        if r.get("peft_fast_peak_mib") is not None and r.get("peft_peak_mib") is not None:
            mem = f"{r['peft_fast_peak_mib']:.0f}/{r['peft_peak_mib']:.0f}"
        err = f"{r['rel_err']:.1e}" if r.get("rel_err") is not None else ""
        lines.append(f"{r['label']:<58} {r['peft_fast_ms']:>12.3f} {r['peft_ms']:>10.3f} {r['ratio']:>6.2f} "
                     f"{mem:>16} {err:>8}")
        if r.get("note"):  # extra per-benchmark figures (overheads, bandwidth), see benchutil.measure
            lines.append(f"  {r['note']}")
    if not report["benchmarks"]:
        lines.append("(no benchmark rows: see bench.log)")
    lines.append("ratio = peft_fast / baseline time (< 1: peft_fast faster); MiB = extra peak memory of one call")
    return lines


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
        "benchmarks": _benchmarks(args.logs),
    }
    text = json.dumps(report, indent=1)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    targets = [RESULTS_DIR / f"gpu_report_{_slug(card)}.json"]
    out = os.environ.get("OUT")
    if out:
        targets.append(Path(out) / "gpu_report.json")
        for name in [f"{s}.log" for s in STAGES] + ["bench.json"]:
            if (args.logs / name).exists():
                shutil.copy(args.logs / name, Path(out) / name)
    for t in targets:
        t.write_text(text)
    print("\n".join(_summary(report)))
    print("report:", ", ".join(str(t) for t in targets))


if __name__ == "__main__":
    main()

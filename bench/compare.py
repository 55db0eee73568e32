"""Judge a benchmark run against a saved one by the peft_fast / baseline time RATIOS, benchmark by benchmark.

Ratios, not times: both sides of a ratio ran on the same machine, interleaved, so the ratio says how peft_fast
does against its baseline whatever the machine's speed or load; raw times move with the machine.

    python bench/compare.py SAVED NEW [--threshold 0.10]     (what `make bench-compare` runs)

SAVED and NEW: bench/results/latest.json files (or a gpu_report JSON, pytest-benchmark JSON, bench_rows.jsonl).
Benchmarks match by label (their sizes are in it, so CPU and GPU runs never match). A benchmark regresses when
its new ratio is more than `threshold` above the saved one (0.10: 10% worse). Prints one line per benchmark and a
verdict; exit status 0 when nothing regressed, 1 when something did, 2 when the files cannot be compared.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # PYTHONSAFEPATH (gpu_check.sh) drops it

from benchreport import ReportError, fmt_ratio, load  # noqa: E402


def compare(saved: list[dict], new: list[dict], threshold: float) -> tuple[list[str], int]:
    """(lines to print, number of regressions)."""
    old = {r["label"]: r for r in saved}
    cur = {r["label"]: r for r in new}
    both = [label for label in cur if label in old]  # in the new run's order
    width = max([len(label) for label in both] + [9])
    head = f"{'benchmark':<{width}} {'saved':>6} {'new':>6} {'change':>7}  verdict"
    lines, counts = [head, "-" * len(head)], {"ok": 0, "REGRESSED": 0, "improved": 0}
    for label in both:
        was, now = old[label]["ratio"], cur[label]["ratio"]
        change = now / was - 1
        verdict = "REGRESSED" if change > threshold else "improved" if change < -threshold else "ok"
        counts[verdict] += 1
        lines.append(f"{label:<{width}} {fmt_ratio(was):>6} {fmt_ratio(now):>6} {change:>+7.1%}  {verdict}")
    only_old = [label for label in old if label not in cur]
    only_new = [label for label in cur if label not in old]
    lines += [f"not in the new run: {label}" for label in only_old]
    lines += [f"new (no saved ratio): {label}" for label in only_new]
    lines.append(f"{len(both)} compared: {counts['ok']} ok, {counts['REGRESSED']} regressed, "
                 f"{counts['improved']} improved (more than {threshold:.0%} better); "
                 f"{len(only_old)} only saved, {len(only_new)} only new")
    return lines, counts["REGRESSED"]


def _describe(path: str, meta: dict) -> str:
    v = meta.get("versions", {})
    return (f"{path}: {meta.get('device', '?')}, {meta.get('created', 'date unknown')}, "
            f"torch {v.get('torch', '?')}, peft {v.get('peft', '?')}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("saved", help="the saved run (make bench-save writes .benchmarks/peft_fast_baseline.json)")
    ap.add_argument("new", help="the run to judge (default of `pytest bench/`: bench/results/latest.json)")
    ap.add_argument("--threshold", type=float, default=0.10,
                    help="fail when a ratio is more than this fraction above its saved value (default 0.10)")
    args = ap.parse_args(argv)
    try:
        (saved_meta, saved), (new_meta, new) = load(args.saved), load(args.new)
    except ReportError as e:
        print(f"bench compare: error: {e}", file=sys.stderr)
        return 2
    print(f"ratio check (ratio = peft_fast / baseline time; a ratio more than {args.threshold:.0%} above the "
          f"saved one fails)")
    print(f"saved {_describe(args.saved, saved_meta)}")
    print(f"new   {_describe(args.new, new_meta)}")
    if saved_meta.get("device") != new_meta.get("device"):
        print(f"note: different devices ({saved_meta.get('device')} vs {new_meta.get('device')}): ratios from "
              "different hardware are not comparable")
    lines, regressions = compare(saved, new, args.threshold)
    print("\n".join(lines))
    if not any(r["label"] in {s["label"] for s in saved} for r in new):
        print("bench compare: FAIL: no benchmark in common, nothing was compared")
        return 2
    if regressions:
        print(f"bench compare: FAIL: {regressions} benchmark(s) regressed by more than {args.threshold:.0%}")
        return 1
    print("bench compare: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())

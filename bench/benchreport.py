"""What a benchmark run leaves behind: the summary table, bench/results/latest.json, and (optional) PNG charts.

Torch-free on purpose, so that bench/compare.py and bench/gpu_report.py
can load results files quickly and anywhere. A row is what benchutil.measure records for one benchmark:
`peft_fast_ms` and `peft_ms` are the medians of the interleaved rounds of peft_fast and of its baseline (the key
says `peft` for history: it is whatever `baseline` names, e.g. PEFT + bitsandbytes or a PEFT-style loop), `ratio`
is peft_fast / baseline, `*_peak_mib` the extra peak memory of one call (see MEMORY_NOTE).

Charts from any saved results file (latest.json, a gpu_report JSON, pytest-benchmark JSON, bench_rows.jsonl):
    .venv/bin/python bench/benchreport.py bench/results/gpu_report_nvidia-h200.json --charts /tmp/charts
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import re
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LATEST = RESULTS_DIR / "latest.json"
SCHEMA = 1
MEMORY_NOTE = ("peak memory: extra bytes during one call; GPU: torch.cuda.max_memory_allocated; CPU: the peak of "
               "the tensor storages the call's ops create (no allocator blocks)")
KEYS = {  # written into latest.json, so that the file explains itself
    "benchmark": "the pytest test case (both sides of it: `-peft_fast` and `-baseline` ids)",
    "group": "pytest-benchmark group = label: one table per group, peft_fast and baseline side by side",
    "peft_fast_ms / peft_ms": "median ms of peft_fast / of the baseline (named in `baseline`), interleaved rounds",
    "ratio": "peft_fast_ms / peft_ms: < 1 means peft_fast is faster; bench/compare.py judges regressions on it",
    "peft_fast_peak_mib / peft_peak_mib": "extra peak memory of one call (GPU: allocator; CPU: new tensor storages)",
    "fixture_*_median_ms": "pytest-benchmark's own median of each side, timed separately (cross-check)",
}


class ReportError(Exception):
    """A results file that cannot be read, or charts that cannot be drawn: a message for people, no traceback."""


# --- versions and the JSON file -------------------------------------------------------------------------------------
def versions() -> dict:
    """Versions of what the run used: the imported module's own when it is loaded, else the installed one's (no
    import: bitsandbytes prints warnings on import, and compare.py should stay quick)."""
    out = {"python": sys.version.split()[0]}
    for name, dist in (("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"), ("peft", "peft"),
                       ("bitsandbytes", "bitsandbytes"), ("pytest_benchmark", "pytest-benchmark"),
                       ("peft_fast", "peft-fast")):
        version = getattr(sys.modules.get(name), "__version__", None)
        if version is None:
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                version = "not installed"
        out[name] = str(version)
    return out


def write_json(path: str | Path, rows: list[dict], **meta) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA, "created": datetime.datetime.now().isoformat(timespec="seconds"), **meta,
           "keys": KEYS, "rows": rows}
    tmp = path.with_name(path.name + ".tmp")  # a reader (compare.py) never sees half a file
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


def load(path: str | Path) -> tuple[dict, list[dict]]:
    """(meta, rows) from any results file the bench tools write: latest.json ({"rows"}), a gpu_report JSON
    ({"benchmarks": [rows]}), pytest-benchmark's JSON ({"benchmarks": [{"extra_info": row}]}), bench_rows.jsonl."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:  # bench_rows.jsonl: one row per line, the last one cut if the run was killed
        doc = []
        for line in text.splitlines():
            try:
                doc.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    if isinstance(doc, dict) and "label" in doc:  # a one-line bench_rows.jsonl
        doc = [doc]
    if isinstance(doc, list):
        meta, rows = {}, doc
    elif isinstance(doc, dict) and isinstance(doc.get("rows"), list):
        meta, rows = {k: v for k, v in doc.items() if k != "rows"}, doc["rows"]
    elif isinstance(doc, dict) and isinstance(doc.get("benchmarks"), list):
        meta = {k: v for k, v in doc.items() if k != "benchmarks"}
        rows = []
        for b in doc["benchmarks"]:
            if "extra_info" in b:  # pytest-benchmark: both sides carry the row; keep it once (peft_fast's side)
                if b["extra_info"].get("impl", "peft_fast") == "peft_fast":
                    rows.append({k: v for k, v in b["extra_info"].items() if k != "impl"})
            else:
                rows.append(b)
    else:
        raise ReportError(f"{path}: not a benchmark results file (no `rows` or `benchmarks` list)")
    rows = [r for r in rows if isinstance(r, dict) and "label" in r and "ratio" in r]
    meta.setdefault("device", meta.get("card") or next((r.get("device") for r in rows if r.get("device")), "?"))
    return meta, rows


def fmt_ratio(v: float) -> str:
    return f"{v:.2f}" if v >= 0.1 else f"{v:.3f}"  # 0.03 vs 0.03 would hide a 30% change


# --- the terminal table ---------------------------------------------------------------------------------------------
def dora_ratios(rows: list[dict]) -> list[str]:
    """bench/memory_report.py's rows: per shape and library, DoRA's peak over LoRA's, the whole step's and the part
    above parameters, gradients and optimizer state (what the adapters' activations and temporaries add)."""
    lines = []
    by = {(r["shape"], r["variant"]): r for r in rows}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for lib in ("peft_fast", "peft"):
            lora, dora = by.get((shape, lib)), by.get((shape, f"{lib} dora"))
            if lora and dora:
                fixed = ("Parameter", "Buffer", "Optstate", "Gradient")
                extra = [r["Total"] - sum(r.get(k, 0.0) for k in fixed) for r in (lora, dora)]
                lines.append(f"{shape:<6} {lib:<10} DoRA/LoRA peak {dora['Total'] / lora['Total']:.3f} "
                             f"(activations and temporaries {extra[1] / max(extra[0], 1e-9):.3f})")
    return lines


def table(rows: list[dict]) -> list[str]:
    """Aligned rows, a `vs <baseline>` heading whenever the baseline changes, notes indented under their row."""
    width = max([len(r["label"]) for r in rows] + [9])
    head = (f"{'benchmark':<{width}} {'peft_fast ms':>12} {'baseline ms':>12} {'ratio':>6} "
            f"{'peak MiB fast/base':>19} {'rel err':>8}")
    lines, baseline = [head, "-" * len(head)], None
    for r in rows:
        if r.get("baseline") != baseline:
            baseline = r.get("baseline")
            lines.append(f"vs {baseline}:")
        mem = ""
        if r.get("peft_fast_peak_mib") is not None and r.get("peft_peak_mib") is not None:
            mem = f"{r['peft_fast_peak_mib']:.0f}/{r['peft_peak_mib']:.0f}"
            if r.get("mem_ratio") is not None:
                mem += f" ({r['mem_ratio']:.2f})"
        err = f"{r['rel_err']:.1e}" if r.get("rel_err") is not None else ""
        lines.append(f"{r['label']:<{width}} {r['peft_fast_ms']:>12.3f} {r['peft_ms']:>12.3f} "
                     f"{fmt_ratio(r['ratio']):>6} {mem:>19} {err:>8}")
        if r.get("note"):  # per-benchmark figures (overheads, bandwidth, tokens/s): see benchutil.measure's extra
            lines.append(f"    {r['note']}")
    return lines


# --- charts (matplotlib: an optional extra, imported only here) ----------------------------------------------------
def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ReportError('charts need matplotlib, an optional extra: pip install -e ".[charts]"') from None
    return matplotlib


def _pyplot():
    require_matplotlib().use("Agg")  # files only: no display on CI or GPU machines
    import matplotlib.pyplot as plt
    return plt


def _ratio_ticks(ax, lo, hi):
    """Readable ticks on the log ratio axis: 1-2-5 steps, plus finer ones near 1 when the range is narrow."""
    from matplotlib.ticker import NullFormatter

    ticks = [m * 10.0 ** e for e in range(-3, 3) for m in (1, 2, 5)]
    if hi / lo < 10:
        ticks += [0.6, 0.7, 0.8, 0.9, 1.1, 1.25, 1.5]
    ticks = sorted(t for t in ticks if lo <= t <= hi)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def _ratio_chart(plt, rows, title):
    rows = [r for r in rows if r.get("ratio")]
    ratios = [r["ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.3 * len(rows)))
    y = range(len(rows))
    # Bars grow from the 1.0 line on a log axis: 0.5x and 2x are equally far from parity.
    ax.barh(y, [v - 1 for v in ratios], left=1, color=["tab:green" if v < 1 else "tab:red" for v in ratios])
    ax.axvline(1.0, color="black", lw=1, ls="--")
    for i, v in enumerate(ratios):
        ax.text(v, i, f" {v:.2f} ", va="center", ha="left" if v >= 1 else "right", fontsize=7)
    ax.set_xscale("log")
    lo, hi = min(ratios + [1.0]) / 1.6, max(ratios + [1.0]) * 1.6
    ax.set_xlim(lo, hi)
    _ratio_ticks(ax, lo, hi)
    ax.set_yticks(list(y), [r["label"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time ratio peft_fast / baseline (log scale): < 1 (green) means peft_fast is faster")
    ax.set_title(f"peft_fast vs baseline, median of interleaved rounds\n{title}", fontsize=9)
    return fig


def _mib(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.2g}"


def _memory_chart(plt, rows, title):
    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.4 * len(rows)))
    y = list(range(len(rows)))
    h = 0.4
    fast, base = [r["peft_fast_peak_mib"] for r in rows], [r["peft_peak_mib"] for r in rows]
    ax.barh([i - h / 2 for i in y], fast, height=h, label="peft_fast")
    ax.barh([i + h / 2 for i in y], base, height=h, label="baseline")
    for i, r in enumerate(rows):
        text = f" {_mib(fast[i])} / {_mib(base[i])} MiB" + (f" ({r['mem_ratio']:.2f}x)" if r.get("mem_ratio") else "")
        ax.text(max(fast[i], base[i]), i, text, va="center", fontsize=7)
    # Decode calls need a few MiB, training steps GBs: linear up to 1 MiB, logarithmic above, so both show.
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, max(fast + base + [1]) * 8)
    ax.set_yticks(y, [r["label"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("extra peak MiB during one call (torch.cuda.max_memory_allocated; symlog scale)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"peak memory of one call (GPU: allocator; CPU: new tensor storages)\n{title}", fontsize=9)
    return fig


def _multi_lora_chart(plt, series, title):
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4.2), squeeze=False)
    for ax, (name, rows) in zip(axes[0], series.items()):
        rows = sorted(rows, key=lambda r: r["n_adapters"])
        n = [r["n_adapters"] for r in rows]
        for key, label, style in (("tokens_per_s", "peft_fast", "o-"), ("peft_tokens_per_s", "baseline", "s-"),
                                  ("base_tokens_per_s", "base model, no LoRA", "k:")):
            if all(r.get(key) for r in rows):
                ax.plot(n, [r[key] for r in rows], style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(n, [str(v) for v in n])
        ax.set_xlabel("distinct adapters in the batch")
        ax.set_ylabel("tokens/s")
        ax.set_ylim(bottom=0)
        ax.set_title(name, fontsize=8)
        ax.legend(fontsize=8)
    fig.suptitle(f"mixed-adapter batches (adapter_names=): tokens/s by adapter count\n{title}", fontsize=9)
    fig.tight_layout()
    return fig


def draw_charts(rows: list[dict], out_dir: str | Path, title: str = "") -> list[str]:
    """Write ratio.png, memory.png (rows with peak memory only) and multi_lora_tokens.png (rows with
    n_adapters and tokens_per_s) into out_dir; returns one line per chart: its path, or why it was not drawn."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []

    def save(fig, name):
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        lines.append(f"chart: {out / name}")

    if any(r.get("ratio") for r in rows):
        save(_ratio_chart(plt, rows, title), "ratio.png")
    mem = [r for r in rows if r.get("peft_fast_peak_mib") is not None and r.get("peft_peak_mib") is not None]
    if mem:
        save(_memory_chart(plt, mem, title), "memory.png")
    else:
        lines.append("chart: memory.png not drawn: no row has peak memory")
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("n_adapters") and r.get("tokens_per_s"):
            series.setdefault(re.sub(r"\s*adapters=\d+", "", r["label"]), []).append(r)
    series = {k: v for k, v in series.items() if len(v) >= 2}  # one point is not a curve
    if series:
        save(_multi_lora_chart(plt, series, title), "multi_lora_tokens.png")
    else:
        lines.append("chart: multi_lora_tokens.png not drawn: no multi-adapter rows with tokens/s "
                     "(bench/test_bench_multi_lora.py did not run)")
    return lines


def chart_title(meta: dict) -> str:
    v = meta.get("versions", {})
    parts = [meta.get("device", "?")] + [f"{k} {v[k]}" for k in ("torch", "peft", "peft_fast") if k in v]
    if meta.get("created"):
        parts.append(str(meta["created"]))
    return " | ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Print the table of, and draw charts from, a saved results file.")
    ap.add_argument("file", help="latest.json, a gpu_report JSON, pytest-benchmark JSON or bench_rows.jsonl")
    ap.add_argument("--charts", metavar="DIR", help="draw PNG charts into DIR (needs matplotlib)")
    args = ap.parse_args(argv)
    try:
        meta, rows = load(args.file)
        if not rows:
            raise ReportError(f"{args.file}: no benchmark rows")
        print("\n".join(table(rows)))
        if args.charts:
            print("\n".join(draw_charts(rows, args.charts, chart_title(meta))))
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `peft-fast` command line (also `python -m peft_fast`): inspect, merge, quantize, convert, bench.

Exit codes: 0 success; 1 the command ran and failed, or found a problem (`inspect`: non-finite tensors, an
interrupted save, unreadable files); 2 bad usage (unknown options, a path that is missing or of the wrong kind, an
output folder that is not empty). User errors print one `error: ...` line to stderr, never a traceback
(`--traceback` shows it, for bug reports).

Each command lives in its own module (cli_inspect, cli_models, cli_convert), imported only when it runs.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import traceback
import warnings
from pathlib import Path
from typing import Optional, Sequence

from .cli_common import CliError, UsageError
from .enums import TASK_TYPES
from .kernels.common.nf4_format import BLOCKSIZES

DESCRIPTION = """Inspect, merge, quantize and convert adapters and models saved in Hugging Face PEFT's format.

Exit codes: 0 success; 1 the command failed, or found a problem (see `inspect --help`); 2 bad usage (options,
a path that is missing or of the wrong kind, an output folder that is not empty without --force). Errors print
one `error: ...` line on stderr; --traceback shows the traceback instead (for bug reports)."""
INSPECT = """Describe the adapters saved in DIR, in PEFT's layout (the default adapter at the top, others in
DIR/<name>/), written by PEFT or peft_fast, as safetensors or .bin: type, rank, alpha, targets, tensors,
parameters, dtypes, file sizes, base model, task, DoRA / rsLoRA / lora_bias, modules_to_save. Every tensor is
checked for NaN and inf.

Exit code 1 if an adapter has a problem (non-finite tensors, a config and weights from two different saves,
unreadable or missing files, a config peft_fast refuses), 2 if DIR is not an adapter folder. The report is
printed in every case but the last."""
MERGE = """Load BASE with transformers, with the Auto class the adapter's task_type names (AutoModelForCausalLM
for CAUSAL_LM; for no task_type, the base class PEFT recorded, else AutoModelForCausalLM), load the adapter in DIR
with peft_fast, merge_and_unload(), and save a plain transformers model to OUT, with the adapter folder's tokenizer
(its added tokens) or else BASE's, when there is one. An adapter trained with added tokens (its folder holds the
embedding tables) is merged into BASE resized to their vocabulary. OUT is staged first and filled when complete."""
QUANTIZE = """Load BASE with transformers, replace its linear layers (not the output head) by 4-bit NF4Linear layers
(peft_fast.quantize: bitsandbytes' exact bytes, without bitsandbytes) and save a transformers 4-bit checkpoint to
OUT: config.json with a bitsandbytes quantization_config, model.safetensors under transformers' 4-bit keys.

Load it back with transformers + bitsandbytes: AutoModelForCausalLM.from_pretrained(OUT); or without
bitsandbytes, as NF4Linear layers: peft_fast.load_quantized(OUT)."""
CONVERT = """Write the adapters in DIR (the default one and those in subfolders) to OUT as safetensors or as .bin,
with the same adapter_config.json. .bin files are read with torch.load(weights_only=True): no code in them runs.
Files are written atomically, weights then config, as save_pretrained writes them."""
BENCH = """Run `pytest bench/` of the source checkout peft_fast is imported from. Every further argument goes to
pytest: `peft-fast bench -k dora -q`; `peft-fast bench -- --help` for pytest's help. An installed wheel has no
bench/ folder: clone the repository for it (exit code 2)."""
DTYPES = ("float32", "float16", "bfloat16")
# `bench` runs pytest in a child, without the current directory on sys.path (the repo root's `kernels/` folder
# would shadow Hugging Face's `kernels` package there), with the child's argv as pytest's.
_PYTEST = "import sys; del sys.path[0]; import pytest; sys.exit(int(pytest.main()))"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's "prog: error:" -> the CLI's one "error:" format, still exit 2
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def _run(module: str, function: str):
    """A command handler that imports its module only when the command runs."""
    def handler(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{module}"), function)(args)
    return handler


def build_parser(prog: str = "peft-fast") -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog=prog, formatter_class=fmt, description=DESCRIPTION)
    p.add_argument("--traceback", action="store_true", help="show the traceback of an error (for bug reports)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, formatter_class=fmt, help=summary, description=description)
        if name != "bench":  # accepted after the command too; SUPPRESS keeps a --traceback given before it
            s.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                           help="show the traceback of an error (for bug reports)")
        return s

    s = command("inspect", "describe a saved adapter folder and check its tensors", INSPECT)
    s.add_argument("dir", metavar="DIR", help="a local adapter folder (as written by save_pretrained)")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    s.set_defaults(func=_run("cli_inspect", "run"))

    s = command("merge", "merge an adapter into its base model and save the result", MERGE)
    s.add_argument("base", metavar="BASE", help="base model: a local folder or a Hugging Face Hub id")
    s.add_argument("dir", metavar="DIR", help="the local adapter folder")
    s.add_argument("out", metavar="OUT", help="output folder (must not exist or be empty, unless --force)")
    s.add_argument("--dtype", choices=("auto",) + DTYPES, default="auto",
                   help="dtype to load BASE in, and so of the merged model (default: auto, the checkpoint's)")
    s.add_argument("--adapter-name", default="default", metavar="NAME",
                   help="which adapter of DIR to merge: 'default' (DIR itself) or NAME (DIR/NAME)")
    s.add_argument("--task-type", choices=TASK_TYPES,
                   help="load BASE with this task's Auto class instead of the one the adapter's task_type names")
    s.add_argument("--safe", action="store_true",
                   help="safe_merge: refuse to merge if any merged weight is not finite")
    s.add_argument("--force", action="store_true", help="write into a non-empty OUT (replacing same-named files)")
    s.set_defaults(func=_run("cli_models", "merge"))

    s = command("quantize", "quantize a model to 4-bit NF4/FP4 and save it", QUANTIZE)
    s.add_argument("base", metavar="BASE", help="model: a local folder or a Hugging Face Hub id")
    s.add_argument("out", metavar="OUT", help="output folder (must not exist or be empty, unless --force)")
    s.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit data type (default nf4)")
    s.add_argument("--blocksize", type=int, default=64, choices=BLOCKSIZES, metavar="N",
                   help=f"block size, one of bitsandbytes' {', '.join(map(str, BLOCKSIZES))} (default 64)")
    s.add_argument("--no-double-quant", action="store_true",
                   help="do not quantize the absmax too (double quantization is on by default)")
    s.add_argument("--dense-experts", action="store_true",
                   help="keep mixture-of-experts stacks 16-bit (as transformers + bitsandbytes can load the result; "
                        "4-bit stacks load with peft_fast.load_quantized only)")
    s.add_argument("--compute-dtype", choices=DTYPES, help="matmul dtype of the 4-bit layers (default: the input's)")
    s.add_argument("--quant-storage", choices=("uint8",) + DTYPES, default="uint8",
                   help="dtype the packed codes are stored in (bnb_4bit_quant_storage; default uint8). A float type "
                        "lets FSDP2 on torch 2.11 shard them; it must then be FSDP's param_dtype too")
    s.add_argument("--dtype", choices=("auto",) + DTYPES, default="auto",
                   help="dtype to load BASE in, which dequantization gives back (default: auto, the checkpoint's)")
    s.add_argument("--task-type", choices=TASK_TYPES, default="CAUSAL_LM",
                   help="the task whose transformers Auto class loads BASE (default CAUSAL_LM)")
    s.add_argument("--force", action="store_true", help="write into a non-empty OUT (replacing same-named files)")
    s.set_defaults(func=_run("cli_models", "quantize"))

    s = command("convert", "convert an adapter folder between .bin and safetensors", CONVERT)
    s.add_argument("dir", metavar="DIR", help="the local adapter folder")
    s.add_argument("out", metavar="OUT", help="output folder (must not exist or be empty, unless --force)")
    s.add_argument("--to", choices=("safetensors", "bin"), default="safetensors",
                   help="the weights format to write (default safetensors)")
    s.add_argument("--force", action="store_true", help="write into a non-empty OUT (its adapter weights of the "
                   "other format are removed: loading would read them instead of, or beside, the new ones)")
    s.set_defaults(func=_run("cli_convert", "run"))

    s = command("bench", "run the benchmarks (pytest bench/ of a source checkout)", BENCH)
    s.set_defaults(func=bench)  # every argument it does not know (all but -h) is pytest's: see main()
    return p


def bench_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "bench"


def bench(args: argparse.Namespace) -> int:
    folder = bench_dir()
    if not (folder / "conftest.py").is_file():
        raise UsageError(f"no benchmarks here: {folder} does not exist (peft_fast is installed from a wheel, "
                         "which has no bench/ folder). Clone the source repository and install it with "
                         "`pip install -e .` to run them.")
    extra = list(args.pytest_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return subprocess.call([sys.executable, "-c", _PYTEST, str(folder), *extra])


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"  # a CLI user needs the message, not the library line that raised it


def main(argv: Optional[Sequence[str]] = None, prog: str = "peft-fast") -> int:
    """Run the command line; returns the exit code (the console script passes it to sys.exit)."""
    parser = build_parser(prog)
    # parse_known_args, so that `bench` passes any option on to pytest (argparse's REMAINDER drops leading options)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.pytest_args = extra
    formatwarning, warnings.formatwarning = warnings.formatwarning, _warning_line
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except CliError as exc:
        if args.traceback:  # the traceback, and still the command's exit code (2: usage)
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except Exception as exc:  # library errors (bad files, models that do not fit, ...): one line, exit 1
        if args.traceback:
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = formatwarning  # main() may run inside a larger program (tests)


__all__ = ["main", "build_parser", "CliError", "UsageError"]

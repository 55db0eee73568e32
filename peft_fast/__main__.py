"""`python -m peft_fast ...`: the `peft-fast` command line (peft_fast/cli.py)."""
import os
import sys

# `python -m` puts the current directory first on sys.path. Run from a source checkout, its top-level `kernels/`
# folder would then shadow Hugging Face's `kernels` package, which transformers and bitsandbytes import lazily. The
# command line needs nothing from the current directory (peft_fast itself is already imported): drop it, as the
# `peft-fast` console script never has it.
if sys.path and not sys.flags.safe_path and os.path.abspath(sys.path[0] or ".") == os.getcwd():
    del sys.path[0]

from .cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python -m peft_fast"))

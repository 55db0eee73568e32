"""Progress bars for the long whole-model operations (merging, unloading, quantizing), as PEFT's
``progressbar=True``: tqdm when asked for and installed (it comes with transformers), otherwise nothing."""
from __future__ import annotations


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, enabled: bool, desc: str, unit: str = "layer"):
    """A bar counting `total` steps (``update()`` each, ``close()`` at the end), or one that shows nothing."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit)

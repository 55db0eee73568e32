"""Progress bars for the long whole-model operations (merging, unloading, quantizing), as PEFT's
``progressbar=True``: tqdm (it comes with transformers) when asked for, otherwise nothing."""
from __future__ import annotations


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, enabled: bool, desc: str):
    """A bar counting `total` layers (``update()`` each, ``close()`` at the end), or one that shows nothing."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="layer")

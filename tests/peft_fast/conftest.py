import os

import pytest

AGAINST_PEFT = os.environ.get("PEFT_FAST_TESTS_AGAINST_PEFT") == "1"


def pytest_collection_modifyitems(config, items):
    """DoRA parity cases are written against PEFT and wait for peft_fast's DoRA issue. Until then peft_fast must
    refuse use_dora=True with NotImplementedError; strict, so the marks fail loudly once DoRA lands."""
    if AGAINST_PEFT:
        return
    mark = pytest.mark.xfail(raises=NotImplementedError, strict=True,
                             reason="use_dora=True raises NotImplementedError until DoRA is implemented")
    for item in items:
        if "dora" in item.nodeid.lower():
            item.add_marker(mark)

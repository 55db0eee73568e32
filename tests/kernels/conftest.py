"""What every kernel test shares, so that no test file repeats it:

- a test with a `device` argument runs on every device here that can run the Triton kernels (the CPU under the
  interpreter, which tests/conftest.py switches on without a GPU; a GPU), or on the CPU alone when there is none
  (unless the test parametrizes `device` itself);
- `@pytest.mark.triton` skips a test where Triton cannot run at all;
- the `tol` fixture: relative tolerances by dtype (float64 exact to rounding, float32 ~1e-5, 16-bit ~1e-2).
"""
import pytest
import torch

from peft_fast.kernels import HAS_TRITON, interpreting

DEVICES = (["cpu"] if interpreting() else []) + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: needs Triton and a device it can run on (skipped otherwise)")


def pytest_generate_tests(metafunc):
    if "device" not in metafunc.fixturenames:
        return
    if any(m.name == "parametrize" and "device" in str(m.args[0]) for m in metafunc.definition.iter_markers()):
        return
    metafunc.parametrize("device", DEVICES or ["cpu"])


def pytest_collection_modifyitems(config, items):
    if HAS_TRITON and DEVICES:
        return
    skip = pytest.mark.skip(reason="no Triton, or no device it can run on")
    for item in items:
        if item.get_closest_marker("triton") is not None:
            item.add_marker(skip)


@pytest.fixture
def tol():
    return TOL

"""Triton's real launch path on a machine without a GPU: a stand-in CUDA driver for an H100/H200 (sm_90).

Kernels compile for real (Triton's own compiler and bundled ptxas, down to a cubin); what a GPU would do with the
cubin, loading it and launching it, is replaced by a recorder. Everything Triton does on the host in between runs
as on a GPU: argument binding and specialization, the kernel cache, launch metadata and hooks, the launcher's
arguments. So the host cost of a launch and the arguments a launch passes can be measured and compared on CPUs.

Import before peft_fast with TRITON_INTERPRET unset (kernels must be decorated as JIT functions), then `install()`.
"""
from __future__ import annotations

import itertools
import os

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise RuntimeError("fake_gpu needs Triton's compiler, not its interpreter: unset TRITON_INTERPRET first.")
os.environ.setdefault("TRITON_INTERPRET", "0")  # settings would switch the interpreter on without a GPU

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

SM90_MAX_SHARED = 232448


class Launch(tuple):
    """One launch as the launcher saw it: (kernel name, function handle, grid, stream, arguments)."""


class Recorder:
    """What a real launcher receives, kept (record=True) or dropped (timing)."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.record = True


RECORDER = Recorder()
_handles = itertools.count(1)


class _Launcher:
    def __init__(self, src, metadata):
        self.name = metadata.name

    def __call__(self, gx, gy, gz, stream, function, *args):
        if RECORDER.record:
            # args: packed metadata, launch metadata, enter hook, exit hook, then the kernel's arguments
            metadata, enter, exit_ = args[1], args[2], args[3]
            for hook in (enter,) if enter is not None else ():
                hook(metadata)
            RECORDER.launches.append(Launch((self.name, function, (gx, gy, gz), stream, args[4:])))
            if exit_ is not None:
                exit_(metadata)


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        if shared > SM90_MAX_SHARED:
            raise RuntimeError(f"{name} needs {shared} bytes of shared memory; sm_90 has {SM90_MAX_SHARED}")
        return object(), next(_handles), 64, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": SM90_MAX_SHARED, "multiprocessor_count": 132}


class FakeDriver:
    """Device `device` (0 unless set), stream `stream` (a number, as CUDA's raw stream handles are)."""

    def __init__(self):
        self.utils = _Utils()
        self.launcher_cls = _Launcher
        self.device, self.stream = 0, 7

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device):
        return self.stream + device

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def install() -> FakeDriver:
    fake = FakeDriver()
    driver.set_active(fake)
    return fake

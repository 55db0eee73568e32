"""A TorchDispatchMode that records the aten ops run while it is active: what the host-work and memory tests count."""
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TorchOps(TorchDispatchMode):
    """`ops`: the name of each op run; `made`: (name, shape, dtype) of each tensor an op returned."""

    def __init__(self):
        super().__init__()
        self.ops, self.made = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        self.ops.append(name)
        self.made += [(name, tuple(t.shape), t.dtype) for t in tree_leaves(out) if hasattr(t, "shape")]
        return out

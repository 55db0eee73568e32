import os

import torch

# The Triton interpreter is chosen when kernels are decorated, so it must be on before peft_fast.kernels loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Test tensors are tiny: OpenMP fan-out costs more than it saves, and on a busy 2-core machine a descheduled
    # worker thread turns each microsecond matmul into tens of milliseconds.
    torch.set_num_threads(1)

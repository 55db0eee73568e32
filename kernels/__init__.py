"""peft_fast.kernels: one op per file, each with a PyTorch reference, a Triton path and a dispatching entry point."""
__all__ = [
    "HAS_TRITON",
    "backend",
    "interpreting",
    "use_triton",
    "lora_linear",
    "lora_linear_reference",
    "lora_linear_triton",
]

if __name__ == "peft_fast.kernels":
    from .backend import HAS_TRITON, backend, interpreting, use_triton
    from .lora_linear import lora_linear, lora_linear_reference, lora_linear_triton
else:
    # From the repo root this directory shadows Hugging Face's `kernels` package, which transformers and
    # bitsandbytes probe at import. Stay an empty module then: loading the ops under a second name would
    # register the torch.library ops twice.
    __all__ = []

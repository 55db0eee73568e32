"""peft_fast.kernels: one op per file, each with a PyTorch reference, a Triton path and a dispatching entry point;
what the ops share lives in common/ (settings read once, dispatch, tiling, the strided LoRA matmul, the custom-op
factory, mixed-batch metadata, the NF4 format)."""
__all__ = [
    "HAS_TRITON",
    "backend",
    "interpreting",
    "settings",
    "use_triton",
    "lora_linear",
    "lora_linear_reference",
    "lora_linear_triton",
    "lora_shrink",
    "lora_shrink_reference",
    "lora_shrink_triton",
    "lora_expand",
    "lora_expand_reference",
    "lora_expand_triton",
    "LoraBatchMeta",
    "make_lora_batch_meta",
    "multi_lora",
    "multi_lora_",
    "multi_lora_reference",
    "multi_lora_triton",
    "NF4State",
    "nf4_quantize",
    "nf4_quantize_reference",
    "nf4_quantize_triton",
    "nf4_dequantize",
    "nf4_dequantize_reference",
    "nf4_dequantize_triton",
    "nf4_state_from_bnb",
    "nf4_from_bnb",
    "nf4_linear",
    "nf4_linear_reference",
    "nf4_linear_triton",
    "nf4_gemv",
    "nf4_gemv_reference",
    "nf4_gemv_triton",
    "qlora_linear",
    "qlora_linear_reference",
    "qlora_linear_triton",
    "dora_norm",
    "dora_norm_reference",
    "dora_norm_triton",
    "dora_norm_nf4",
    "dora_norm_nf4_reference",
    "dora_norm_nf4_triton",
    "dora_linear",
    "dora_linear_reference",
    "dora_linear_triton",
    "dora_dropout_linear",
    "dora_dropout_linear_reference",
    "dora_dropout_linear_triton",
    "experts_meta",
    "grouped_lora",
    "grouped_lora_reference",
    "grouped_lora_torch",
    "grouped_lora_triton",
]

if __name__ == "peft_fast.kernels":
    from .common import settings
    from .common.backend import HAS_TRITON, backend, interpreting, use_triton
    from .common.batch_meta import LoraBatchMeta, make_lora_batch_meta
    from .common.nf4_format import NF4State, nf4_from_bnb, nf4_state_from_bnb
    from .lora_linear import lora_linear, lora_linear_reference, lora_linear_triton
    from .lora_shrink import lora_shrink, lora_shrink_reference, lora_shrink_triton
    from .lora_expand import lora_expand, lora_expand_reference, lora_expand_triton
    from .multi_lora import multi_lora, multi_lora_, multi_lora_reference, multi_lora_triton
    from .nf4_quantize import nf4_quantize, nf4_quantize_reference, nf4_quantize_triton
    from .nf4_dequantize import nf4_dequantize, nf4_dequantize_reference, nf4_dequantize_triton
    from .nf4_gemv import nf4_gemv, nf4_gemv_reference, nf4_gemv_triton
    from .nf4_linear import nf4_linear, nf4_linear_reference, nf4_linear_triton
    from .qlora_linear import qlora_linear, qlora_linear_reference, qlora_linear_triton
    from .dora_norm import (dora_norm, dora_norm_nf4, dora_norm_nf4_reference, dora_norm_nf4_triton,
                            dora_norm_reference, dora_norm_triton)
    from .dora_linear import dora_linear, dora_linear_reference, dora_linear_triton
    from .dora_dropout_linear import dora_dropout_linear, dora_dropout_linear_reference, dora_dropout_linear_triton
    from .grouped_lora import (experts_meta, grouped_lora, grouped_lora_reference, grouped_lora_torch,
                               grouped_lora_triton)
else:
    # From the repo root this directory shadows Hugging Face's `kernels` package, which transformers and
    # bitsandbytes probe at import. Stay an empty module then: loading the ops under a second name would
    # register the torch.library ops twice.
    __all__ = []

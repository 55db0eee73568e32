"""peft_fast reads its switches (PEFT_FAST_BACKEND, PEFT_FAST_LORA_DOT) once, at import, into one settings object:
tests change that object, not the environment."""
import dataclasses


def use_settings(monkeypatch, **changes):
    """Replace peft_fast's settings for one test, e.g. use_settings(monkeypatch, backend="torch"); the monkeypatch
    puts them back."""
    from peft_fast.kernels import settings

    monkeypatch.setattr(settings, "_current", dataclasses.replace(settings.current(), **changes))


def hub_kernels_checkpointing(model):
    """The context to compile a checkpointed training step of `model` in: transformers >= 5.25 with Hugging Face's
    kernels installed sets a ContextVar in each attention's forward (kernels' per-model routing), a side effect
    dynamo refuses inside checkpointed layers unless told not to replay it in the backward (harmless: the variable
    is reset on return). Plain transformers models need it too; the README says so. Only for such models, so that a
    side effect of peft_fast's own still fails the tests."""
    import contextlib

    import torch

    if any("_kernel_funcs" in vars(m) for m in model.modules()):
        return torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)
    return contextlib.nullcontext()

"""Values a layer keeps across calls (DoRA's eval scale, mixed-batch stacks) made during a forward under
torch.inference_mode(): later forwards outside it must still work as PEFT's do (inference tensors can neither be
saved for backward nor written in place outside inference mode)."""
import torch

from tiny_models import assert_close, inputs, loss_of, make_dora_pair, make_pair, out

NAMES = ["default", "__base__", "default"]


def test_dora_eval_forward_with_grad_after_inference_mode():
    """Eval-mode training (dropout off) or an RL log-prob pass after generate() under inference_mode."""
    _, r, i = make_dora_pair("mlp")
    x = inputs("mlp")
    for model in (r, i):
        model.eval()
        with torch.inference_mode():
            model(**x)
        loss_of(model, x).backward()
    grads = {n: p.grad for n, p in r.named_parameters() if p.grad is not None}
    assert grads
    for n, p in i.named_parameters():
        if n in grads:
            assert_close(p.grad, grads[n], msg=n)


def test_mixed_batch_stacks_made_under_inference_mode_are_rewritten_later():
    _, r, i = make_pair("mlp")
    x = inputs("mlp", batch=len(NAMES))
    for model in (r, i):
        model.eval()
        with torch.inference_mode():  # a server's warm-up
            model(**x, adapter_names=NAMES)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1)
        model.train()
        model.eval()  # the switch of mode rewrites every slot (README, "Stacks")
    with torch.no_grad():
        assert_close(out(i, x, adapter_names=NAMES), out(r, x, adapter_names=NAMES))


def test_empty_mixed_batch():
    _, r, i = make_pair("mlp")
    x = {"X": torch.randn(0, 16)}
    with torch.no_grad():
        got, want = out(i.eval(), x, adapter_names=[]), out(r.eval(), x, adapter_names=[])
    assert got.shape == want.shape == (0, want.shape[-1])

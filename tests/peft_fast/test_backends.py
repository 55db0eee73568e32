"""A patched model gives the same outputs and gradients on the Triton path as on the PyTorch reference,
and it compiles without graph breaks."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peft_fast
from switches import use_settings

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter runs float64 exactly; on a GPU, float32 dots may use tf32.
DTYPE, ATOL = (torch.float32, 2e-3) if DEVICE == "cuda" else (torch.float64, 1e-10)


def _tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=40, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).to(DEVICE, DTYPE)


def _run(model, ids, monkeypatch, backend):
    use_settings(monkeypatch, backend=backend)
    model.zero_grad()
    logits = model(ids).logits
    logits.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def test_triton_path_matches_reference_through_a_model(monkeypatch):
    model = peft_fast.patch(_tiny_llama(), peft_fast.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                init_lora_weights=False))
    ids = torch.randint(0, 40, (2, 5), device=DEVICE)
    ref_out, ref_grads = _run(model, ids, monkeypatch, "torch")
    tri_out, tri_grads = _run(model, ids, monkeypatch, "triton")
    assert ref_grads.keys() == tri_grads.keys() and len(ref_grads) == 14
    torch.testing.assert_close(tri_out, ref_out, atol=ATOL, rtol=ATOL)
    for name in ref_grads:
        torch.testing.assert_close(tri_grads[name], ref_grads[name], atol=ATOL, rtol=ATOL, msg=name)


def test_triton_path_dropout_trains(monkeypatch):
    """With dropout the masks differ from torch's RNG, but the loss still goes down on the Triton path."""
    use_settings(monkeypatch, backend="triton")
    model = peft_fast.patch(_tiny_llama(), peft_fast.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                lora_dropout=0.3))
    ids = torch.randint(0, 40, (2, 6), device=DEVICE)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patched_model_compiles_without_graph_breaks(monkeypatch, backend):
    use_settings(monkeypatch, backend=backend)
    torch._dynamo.reset()
    model = peft_fast.patch(_tiny_llama(), peft_fast.LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                                init_lora_weights=False))
    eager = copy.deepcopy(model)
    ids = torch.randint(0, 40, (2, 5), device=DEVICE)

    def loss_fn(m):
        return m(ids).logits.pow(2).mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss_c = compiled(model)
    loss_c.backward()
    loss_e = loss_fn(eager)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, atol=ATOL, rtol=ATOL)
    grads_e = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if n in grads_e:
            torch.testing.assert_close(p.grad, grads_e[n], atol=ATOL, rtol=ATOL, msg=n)

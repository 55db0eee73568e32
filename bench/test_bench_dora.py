"""DoRA (use_dora=True) on a stack of linear layers: peft_fast DoRA against PEFT DoRA, and each against its own LoRA.

Baseline: Hugging Face PEFT's DoRA (`lora.dora.DoraLinearLayer`) on an identical copy with the same adapter
weights. In the same interleaved rounds, peft_fast LoRA and PEFT LoRA over the same base and A, B are timed too, so
each row also reports DoRA/LoRA time ratios for both libraries (`dora_over_lora_fast`, `dora_over_lora_peft`)
and, on a GPU, peft_fast's DoRA/LoRA peak-memory ratio (targets: eval <= 1.05x, training <= 1.1x time, <= 1.05x
memory). CPU: a stack of 1024-wide layers; GPU: Llama-3-8B's layer shapes (4096 -> 4096 -> 14336 -> 4096).
"""
import copy

import peft
import pytest
import torch
from torch import nn

import peft_fast
from benchutil import ALPHA, BASE_DTYPE, DEVICE, ON_GPU, RANK, both_sides, inference, measure, peak_mib, rel_err

if ON_GPU:  # Llama-3-8B's three projection shapes in one stack: 4096x4096, 4096->14336, 14336->4096
    WIDTHS = [4096, 4096, 14336, 4096]
    TOKENS = 4096
else:
    WIDTHS = [1024, 1024, 1024, 1024, 1024]
    TOKENS = 256
DECODE_TOKENS = (1, 4, 8)
BASELINE = f"peft {peft.__version__} DoRA"


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=False, device=DEVICE, dtype=BASE_DTYPE)
                                    for i, o in zip(WIDTHS[:-1], WIDTHS[1:]))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _models():
    """{(lib, variant): model} over identical bases and identical A, B (and magnitudes, for DoRA)."""
    torch.manual_seed(0)
    base = Stack()
    kw = dict(r=RANK, lora_alpha=ALPHA, target_modules=[str(k) for k in range(len(WIDTHS) - 1)],
              init_lora_weights=False)
    models = {}
    for variant, dora in (("dora", True), ("lora", False)):
        models[("fast", variant)] = peft_fast.get_peft_model(copy.deepcopy(base), peft_fast.LoraConfig(
            use_dora=dora, **kw))
        models[("peft", variant)] = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(use_dora=dora, **kw))
    state = {k: v for k, v in models[("peft", "dora")].state_dict().items() if "lora_" in k}
    for key, model in models.items():
        own = {k: v for k, v in state.items() if k in model.state_dict()}
        model.load_state_dict(own, strict=False)
    return models


def _ratios(row, fast_lora_mem=None):
    out = {"dora_over_lora_fast": row["peft_fast_ms"] / row["fast_lora_ms"],
           "dora_over_lora_peft": row["peft_ms"] / row["peft_lora_ms"]}
    note = (f"DoRA/LoRA time: peft_fast {out['dora_over_lora_fast']:.3f}, "
            f"peft {out['dora_over_lora_peft']:.3f}")
    if fast_lora_mem and row.get("peft_fast_peak_mib") is not None:
        out["fast_lora_peak_mib"] = fast_lora_mem
        out["dora_over_lora_mem_fast"] = row["peft_fast_peak_mib"] / fast_lora_mem
        note += f"; DoRA/LoRA peak memory (peft_fast) {out['dora_over_lora_mem_fast']:.3f}"
    out["note"] = note
    return out


@both_sides
@pytest.mark.parametrize("tokens", DECODE_TOKENS)
def test_dora_decode(benchmark, impl, tokens):
    models = _models()
    for m in models.values():
        m.eval()
    x = torch.randn(tokens, 1, WIDTHS[0], device=DEVICE, dtype=BASE_DTYPE)

    def fwd(model):
        return inference(model, x)

    err = rel_err(fwd(models[("fast", "dora")])(), fwd(models[("peft", "dora")])())
    label = f"dora decode stack {'x'.join(map(str, WIDTHS))} M={tokens}"
    also = {"fast_lora": fwd(models[("fast", "lora")]), "peft_lora": fwd(models[("peft", "lora")])}
    measure(benchmark, impl, label, fwd(models[("fast", "dora")]), fwd(models[("peft", "dora")]), baseline=BASELINE,
            err=err, also=also, extra=_ratios)


@both_sides
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_dora_train_step(benchmark, impl, dropout):
    models = _models()
    for m in models.values():
        m.train()
        for layer in m.modules():
            if isinstance(layer, nn.Dropout):
                layer.p = dropout
        for d in [mod for mod in m.modules() if hasattr(mod, "lora_dropout")]:
            for name in list(d.lora_dropout.keys()):
                d.lora_dropout[name] = nn.Dropout(dropout) if dropout else nn.Identity()
    x = torch.randn(1, TOKENS, WIDTHS[0], device=DEVICE, dtype=BASE_DTYPE, requires_grad=True)
    gy = torch.randn(1, TOKENS, WIDTHS[-1], device=DEVICE, dtype=BASE_DTYPE)

    def step(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)

        def run():
            model(x).backward(gy)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    err = None
    if dropout == 0:
        with torch.no_grad():
            err = rel_err(models[("fast", "dora")](x), models[("peft", "dora")](x))
    steps = {k: step(m) for k, m in models.items()}
    fast_lora_mem = peak_mib(steps[("fast", "lora")])
    label = f"dora train step stack {'x'.join(map(str, WIDTHS))} M={TOKENS} p={dropout}"
    also = {"fast_lora": steps[("fast", "lora")], "peft_lora": steps[("peft", "lora")]}
    measure(benchmark, impl, label, steps[("fast", "dora")], steps[("peft", "dora")], baseline=BASELINE, err=err,
            also=also, extra=lambda row: _ratios(row, fast_lora_mem))

"""Launch plans: a layer decides once per plan key what forward runs, keeps that as explicit state (`_plans`), and
drops it at every event that changes it; between events forward only runs the plan. Plans hold handles to the
adapter modules, never tensors, so parameter swaps (p.data = ..., a new Parameter as FSDP2's resharding or
hot-swapping install) are read at the next call without a new plan."""
import copy

import pytest
import torch
from switches import use_settings
from torch_ops import TorchOps
from tiny_models import AGAINST_PEFT, base_model, default_cfg, inputs, out

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast's launch plans")

import peft_fast  # noqa: E402
from peft_fast import LoraConfig, LoraLinear  # noqa: E402
from peft_fast.kernels.common import lora_mm  # noqa: E402


def _model(**kw):
    torch.manual_seed(0)
    return peft_fast.get_peft_model(base_model("mlp"), LoraConfig(**default_cfg("mlp", **kw)))


def _layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def _planned(model) -> bool:
    return all(m._plans for m in _layers(model))


def _dropped(model) -> bool:
    return not any(m._plans for m in _layers(model))


def _fresh_output(model, x):
    """The same model's output computed without any plan or cache (a deep copy starts with none), by the same path
    (same grad mode) as the caller's."""
    return out(copy.deepcopy(model), x)


def _count_plans(monkeypatch, model) -> list:
    """How often the layers of `model` (not of its copies) build a plan."""
    built, mine = [], {id(m) for m in _layers(model)}
    real = LoraLinear.make_plan
    monkeypatch.setattr(LoraLinear, "make_plan", lambda self, x: (id(self) in mine and built.append(1)) or
                        real(self, x))
    return built


def test_plans_are_built_once_and_reused(monkeypatch):
    model = _model()
    built = _count_plans(monkeypatch, model)
    x = inputs("mlp")
    for _ in range(3):
        out(model, x)
    assert len(built) == len(_layers(model)) == 2
    plans = [dict(m._plans) for m in _layers(model)]
    out(model, x)
    assert [dict(m._plans) for m in _layers(model)] == plans  # the same plan objects
    with torch.no_grad():
        out(model, x)  # no autograd: another key, one more plan per layer
    assert len(built) == 4


EVENTS = {
    "add_adapter": lambda m, tmp: m.add_adapter("other", LoraConfig(**default_cfg("mlp", r=3))),
    "set_adapter": lambda m, tmp: (m.add_adapter("other", LoraConfig(**default_cfg("mlp", r=3))),
                                   [l._plans.update({"stale": None}) for l in _layers(m)], m.set_adapter("other")),
    "delete_adapter": lambda m, tmp: (m.add_adapter("other", LoraConfig(**default_cfg("mlp", r=3))),
                                      [l._plans.update({"stale": None}) for l in _layers(m)],
                                      m.delete_adapter("other")),
    "load_adapter over an adapter": lambda m, tmp: (m.save_pretrained(tmp), m.load_adapter(tmp, "default")),
    "merge_adapter": lambda m, tmp: m.merge_adapter(),
    "unmerge_adapter": lambda m, tmp: (m.merge_adapter(), [l._plans.update({"stale": None}) for l in _layers(m)],
                                       m.unmerge_adapter()),
    "disable_adapter": lambda m, tmp: m.base_model.disable_adapter_layers(),
    "train -> eval": lambda m, tmp: m.eval(),
    ".to(dtype)": lambda m, tmp: m.double(),
    "hotswap": lambda m, tmp: (m.save_pretrained(tmp), peft_fast.hotswap_adapter(m, tmp, "default")),
}


@pytest.mark.parametrize("event", list(EVENTS))
def test_every_event_drops_the_plans_and_the_next_call_is_right(event, tmp_path):
    model = _model()
    x = inputs("mlp")
    out(model, x)
    assert _planned(model)
    EVENTS[event](model, str(tmp_path))
    assert _dropped(model), f"{event} left a plan behind"
    if event == ".to(dtype)":
        x = {k: v.double() for k, v in x.items()}
    got = out(model, x)
    assert _planned(model) or event == "disable_adapter"  # disabled layers run the base without a plan
    torch.testing.assert_close(got, out(copy.deepcopy(model), x))


def test_train_eval_calls_that_keep_the_mode_keep_the_plans():
    """Trainer calls model.train() every step: plans are keyed on the mode, so they survive it."""
    model = _model()
    model.train()
    out(model, inputs("mlp"))
    plans = [dict(m._plans) for m in _layers(model)]
    model.train()
    assert [dict(m._plans) for m in _layers(model)] == plans


def test_optimizer_steps_and_parameter_swaps_need_no_new_plan(monkeypatch):
    model = _model()
    x = inputs("mlp")
    out(model, x)
    built = _count_plans(monkeypatch, model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = out(model, x).detach()
    out(model, x).pow(2).mean().backward()
    opt.step()
    after = out(model, x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, _fresh_output(model, x))
    layer = _layers(model)[0]
    a = layer.lora_A["default"]
    a.weight.data = torch.randn_like(a.weight)  # a new storage under the same Parameter
    torch.testing.assert_close(out(model, x), _fresh_output(model, x))
    a.weight = torch.nn.Parameter(torch.randn_like(a.weight))  # a new Parameter, as FSDP2's resharding installs
    torch.testing.assert_close(out(model, x), _fresh_output(model, x))
    assert built == []


def test_a_settings_change_selects_another_plan(monkeypatch):
    model = _model()
    x = inputs("mlp")
    use_settings(monkeypatch, backend="torch")
    want = out(model, x)
    use_settings(monkeypatch, backend="triton")
    got = out(model, x)
    assert all(len(m._plans) == 2 for m in _layers(model))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_copies_start_without_plans():
    model = _model()
    out(model, inputs("mlp"))
    clone = copy.deepcopy(model)
    assert _dropped(clone) and _planned(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(2)
    assert not torch.allclose(out(clone, inputs("mlp")), out(model, inputs("mlp")))


class _CountLaunches:
    def __init__(self, kernel, counts):
        self.kernel, self.counts = kernel, counts

    def __getitem__(self, grid):
        self.counts.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_launches_per_layer_on_the_triton_path(monkeypatch, dropout):
    """Forward: the LoRA shrink and expand (the base matmul is cuBLAS). Backward: two launches, dB beside dz, then
    dA beside dx's LoRA part (the issue's bound: three besides cuBLAS)."""
    use_settings(monkeypatch, backend="triton")
    launches = []
    monkeypatch.setattr(lora_mm, "_lora_mm_kernel", _CountLaunches(lora_mm._lora_mm_kernel, launches))
    monkeypatch.setattr(lora_mm, "_lora_mm2_kernel", _CountLaunches(lora_mm._lora_mm2_kernel, launches))
    model = _model(lora_dropout=dropout, target_modules=["lin1"])
    model.train()
    x = {"X": torch.randn(4, 16, requires_grad=True)}
    y = out(model, x)
    assert len(launches) == 2
    y.sum().backward()
    assert len(launches) == 4


def _ops_of(fn):
    with TorchOps() as mode:
        fn()
    return sorted(mode.ops)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_torch_ops_per_layer_on_the_triton_path(monkeypatch, dropout):
    """Host work a training step of one layer does besides its four launches (the lean launch path): forward, the
    base linear and z's buffer (and the dropout seed); backward, dx's base matmul and the three buffers dB, dz, dA.
    No views, reshapes, transposes or zero fills: PEFT's layer runs 8 + 19 torch ops at this shape, and host time
    per op is what a GPU waits on at small layers (bench/host_overhead.py)."""
    use_settings(monkeypatch, backend="triton")
    launches = []
    for name in ("_lora_mm_kernel", "_lora_mm2_kernel"):  # stubbed: the interpreter's own torch ops are not ours
        monkeypatch.setattr(lora_mm, name, _StubLaunches(launches))
    model = _model(lora_dropout=dropout, target_modules=["lin1"])
    model.train()
    layer = _mlp_layer(model, "lin1")
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).sum().backward()  # plans and caches made
    base = _ops_of(lambda: layer.base_layer(x))
    y = None

    def forward():
        nonlocal y
        y = layer(x)

    seed = ["aten.randint.low"] if dropout else []
    assert _ops_of(forward) == sorted(base + ["aten.empty.memory_format"] + seed)
    dy, leaves = torch.ones_like(y), [x] + [p for p in layer.parameters() if p.requires_grad]
    assert len(leaves) == 3
    # autograd.grad, not backward: what autograd adds to store gradients in .grad is the same for PEFT
    backward = _ops_of(lambda: torch.autograd.grad(y, leaves, dy))
    assert backward == sorted(["aten.mm.default"] + ["aten.empty.memory_format"] * 3)
    assert len(launches) == 2 * 4  # the warm-up step's and this one's


class _StubLaunches:
    def __init__(self, launches):
        self.launches = launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(grid)


@pytest.mark.parametrize("rows", [4, 40])
def test_inference_launches_one_kernel_at_decode(monkeypatch, rows):
    """In eval without grad, a decode call (at most 16 rows) runs the whole LoRA delta as one launch; more rows take
    the shrink and expand."""
    from peft_fast.kernels.common import lora_decode

    use_settings(monkeypatch, backend="triton")
    launches = []
    for mod, name in ((lora_mm, "_lora_mm_kernel"), (lora_decode, "_lora_decode_kernel")):
        monkeypatch.setattr(mod, name, _CountLaunches(getattr(mod, name), launches))
    model = _model(lora_dropout=0.1, target_modules=["lin1"])
    model.eval()
    with torch.no_grad():
        out(model, {"X": torch.randn(rows, 16)})
    assert len(launches) == (1 if rows <= 16 else 2)


def _mlp_layer(model, name="lin0"):
    return getattr(model.base_model.model, name)


def _replace_base(model):
    layer = _mlp_layer(model)
    base = torch.nn.Linear(16, 32)
    base.requires_grad_(False)
    layer.base_layer = base


def _replace_lora_a(model):
    _mlp_layer(model).lora_A["default"] = torch.nn.Linear(16, 4, bias=False)


def _scale_adapter(model):
    _mlp_layer(model).scaling["default"] *= 3


def _swap_base_storage(model):
    w = _mlp_layer(model).base_layer.weight
    w.data = torch.randn_like(w)  # a new storage under the same version counter


def _replace_lora_a_dict(model):
    _mlp_layer(model).lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(16, 4, bias=False)})


def _replace_scaling_dict(model):
    layer = _mlp_layer(model)
    layer.scaling = {k: v * 3 for k, v in layer.scaling.items()}


def _swap_lora_b_weight(model):
    b = _mlp_layer(model).lora_B["default"]
    b.weight = torch.nn.Parameter(torch.randn_like(b.weight))


CHANGES = {"replace base_layer": _replace_base, "replace lora_A[name]": _replace_lora_a,
           "scaling[name] *= 3": _scale_adapter, "base weight.data = ...": _swap_base_storage,
           "replace the lora_A dict": _replace_lora_a_dict, "replace the scaling dict": _replace_scaling_dict,
           "a new lora_B weight Parameter": _swap_lora_b_weight}


@pytest.mark.parametrize("backend", ["auto", "triton"])  # on a CPU, auto runs the reference ops
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_changes_outside_the_api_are_seen_at_the_next_call(monkeypatch, change, mode, use_dora, backend):
    """What a plan does not decide (parameters, scalings, the adapter dicts, the base module and its weight) it reads
    at call time, and values derived from them follow the parameters' identity, storage and version."""
    use_settings(monkeypatch, backend=backend)
    model = _model(use_dora=use_dora, lora_dropout=0.0)
    getattr(model, mode)()
    x = inputs("mlp")
    out(model, x)
    CHANGES[change](model)
    torch.testing.assert_close(out(model, x), _fresh_output(model, x), rtol=0, atol=0)


def test_replacing_the_dropout_module_is_seen():
    model = _model(lora_dropout=0.1)
    x = inputs("mlp")
    out(model, x)
    _mlp_layer(model).lora_dropout["default"] = torch.nn.Dropout(0.5)
    torch.manual_seed(7)
    got = out(model, x)
    fresh = copy.deepcopy(model)
    torch.manual_seed(7)
    torch.testing.assert_close(got, out(fresh, x), rtol=0, atol=0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_a_weight_bitsandbytes_repacked_after_planning_runs_through_bitsandbytes(use_dora):
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight into its own layout the first time its module
    runs in eval without gradients; a fused plan made before then falls back to the module and PEFT's order."""
    bnb = pytest.importorskip("bitsandbytes")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0 = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")

        def forward(self, x):
            return self.lin0(x)

    torch.manual_seed(0)
    model = peft_fast.get_peft_model(Model(), LoraConfig(target_modules=["lin0"], init_lora_weights=False,
                                                         use_dora=use_dora)).eval()
    layer = model.base_model.model.lin0
    if not getattr(layer.base_layer, "support_avx512bf16_for_cpu", False):
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    x = torch.randn(3, 64)
    first = layer(x.clone().requires_grad_())  # the fused NF4 plan
    with torch.no_grad():
        layer(x)  # bitsandbytes' module runs and repacks its weight
    assert layer.base_layer.weight.quant_state.packing_format_for_cpu
    again = layer(x.clone().requires_grad_())  # the same plan key as the first call
    torch.testing.assert_close(again, first, atol=1e-2, rtol=1e-2)  # bnb's bf16 kernel against our float32 path

"""Parameter names, shapes, requires_grad and counts match PEFT for every configuration in CONFIG_CASES."""
import warnings

import pytest
import torch

from tiny_models import (
    CONFIG_CASES,
    assert_same_params,
    case_id,
    make_pair,
    ref,
)


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[case_id(c) for c in CONFIG_CASES])
def test_named_parameters_match_peft(case):
    kind, kw = case
    _, ref_model, impl_model = make_pair(kind, copy=False, **kw)
    assert_same_params(ref_model, impl_model)
    # at least one LoRA weight exists and is trainable: the config really targeted something
    assert any(".lora_A." in n and p.requires_grad for n, p in impl_model.named_parameters())
    # the buffers (e.g. rotary inv_freq) are kept under the same names
    assert set(dict(impl_model.named_buffers())) == set(dict(ref_model.named_buffers()))
    # state_dict keys, not only parameters (tied weights, buffers, ...)
    assert set(impl_model.state_dict()) == set(ref_model.state_dict())


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[case_id(c) for c in CONFIG_CASES])
def test_trainable_parameter_count_and_print(case, capsys):
    kind, kw = case
    _, ref_model, impl_model = make_pair(kind, copy=False, **kw)
    expected = ref_model.get_nb_trainable_parameters()
    assert impl_model.get_nb_trainable_parameters() == expected
    assert expected[0] == sum(p.numel() for p in impl_model.parameters() if p.requires_grad)

    capsys.readouterr()
    ref_model.print_trainable_parameters()
    ref_line = capsys.readouterr().out
    impl_model.print_trainable_parameters()
    impl_line = capsys.readouterr().out
    assert ref_line.startswith("trainable params: ")
    assert impl_line == ref_line


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[case_id(c) for c in CONFIG_CASES])
def test_targeted_modules_match_peft(case):
    """The set of wrapped modules (those with a base_layer) and the rank of each are PEFT's."""
    kind, kw = case
    _, ref_model, impl_model = make_pair(kind, copy=False, **kw)

    def ranks(model):
        out = {}
        for n, p in model.named_parameters():
            if ".lora_A." in n:
                out[n.split(".lora_A.")[0]] = p.shape[0]
        return out

    assert ranks(impl_model) == ranks(ref_model)
    # the resolved target_modules stored in the config after injection (e.g. "all-linear" expanded) are PEFT's
    r_t = ref_model.peft_config["default"].target_modules
    i_t = impl_model.peft_config["default"].target_modules
    if isinstance(r_t, str):
        assert i_t == r_t
    else:
        assert set(i_t) == set(r_t)


def test_modules_to_save_names_and_trainability():
    _, ref_model, impl_model = make_pair("llama", modules_to_save=["lm_head"])
    names = {n: p.requires_grad for n, p in impl_model.named_parameters() if "lm_head" in n}
    assert names == {
        n: p.requires_grad for n, p in ref_model.named_parameters() if "lm_head" in n
    }
    assert names["base_model.model.lm_head.modules_to_save.default.weight"] is True
    assert names["base_model.model.lm_head.original_module.weight"] is False


def test_bias_all_makes_every_bias_trainable():
    _, ref_model, impl_model = make_pair("gpt2", bias="all")
    trainable_biases = sorted(n for n, p in impl_model.named_parameters() if n.endswith(".bias") and p.requires_grad)
    all_biases = sorted(n for n, p in impl_model.named_parameters() if n.endswith(".bias"))
    assert trainable_biases == all_biases
    assert trainable_biases == sorted(
        n for n, p in ref_model.named_parameters() if n.endswith(".bias") and p.requires_grad
    )


def test_bias_lora_only_only_adapted_layers():
    _, ref_model, impl_model = make_pair("mlp", bias="lora_only")
    trainable = sorted(n for n, p in impl_model.named_parameters() if n.endswith("bias") and p.requires_grad)
    assert trainable == sorted(n for n, p in ref_model.named_parameters() if n.endswith("bias") and p.requires_grad)
    assert "base_model.model.lin0.base_layer.bias" in trainable
    assert not any("lin2" in n or "norm" in n for n in trainable)


def test_lora_bias_adds_a_bias_to_lora_B():
    _, ref_model, impl_model = make_pair("mlp", lora_bias=True)
    b = dict(impl_model.named_parameters())["base_model.model.lin0.lora_B.default.bias"]
    assert b.shape == (32,) and b.requires_grad
    assert "base_model.model.lin0.lora_A.default.bias" not in dict(impl_model.named_parameters())


def test_dora_magnitude_vector_name_and_shape():
    _, ref_model, impl_model = make_pair("llama", use_dora=True, copy=False)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector.default.weight"
    p = dict(impl_model.named_parameters())[key]
    assert p.shape == (32,) and p.requires_grad
    # the magnitude vector is initialised to the row norms of the base weight, like PEFT
    torch.testing.assert_close(p.detach(), dict(ref_model.named_parameters())[key].detach())


def test_base_weights_frozen_and_shared_parameter_names():
    _, ref_model, impl_model = make_pair("llama")
    for n, p in impl_model.named_parameters():
        if "lora_" not in n:
            assert not p.requires_grad, n
    # the wrapper prefix is PEFT's: base_model.model.<original name>
    assert all(n.startswith("base_model.model.") for n, _ in impl_model.named_parameters())
    assert isinstance(ref_model, ref.PeftModel)


class _Block(torch.nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.lin, self.norm = torch.nn.Linear(8, 8), norm

    def forward(self, x):
        return self.norm(self.lin(x))


class _Shared(torch.nn.Module):
    """One LayerNorm placed in two blocks, and an alias of the head."""

    def __init__(self):
        super().__init__()
        norm = torch.nn.LayerNorm(8)
        self.blocks = torch.nn.ModuleList([_Block(norm) for _ in range(2)])
        self.head = torch.nn.Linear(8, 4)
        self.alias = self.head

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.alias(x)


class _SharedBlock(_Shared):
    """A whole block registered twice: its norm sits at one place (one wrapper, as in PEFT)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([self.blocks[0], self.blocks[0], _Block(torch.nn.LayerNorm(8))])


@pytest.mark.parametrize("cls, saved", [(_Shared, ["norm"]), (_Shared, ["alias"]), (_SharedBlock, ["norm"])])
def test_modules_to_save_at_every_place_a_module_is_reachable(cls, saved, tmp_path):
    """PEFT lists modules with duplicates kept: a module shared by two blocks gets a trained copy in each, and an
    alias is wrapped where it is named. Names, outputs after training one step, and files match; each loads the
    other's file."""
    from tiny_models import impl

    models = {}
    for lib in (ref, impl):
        torch.manual_seed(0)
        model = lib.get_peft_model(cls(), lib.LoraConfig(r=2, target_modules=["lin"], modules_to_save=saved))
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.grad = torch.full_like(p, 0.1) * (1 + len(n) % 3)
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
        models[lib] = model
    assert_same_params(models[ref], models[impl])
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(models[impl](x), models[ref](x))
    for lib, model in models.items():
        model.save_pretrained(tmp_path / lib.__name__)
    for lib, other in ((ref, impl), (impl, ref)):
        torch.manual_seed(0)  # the same base
        with warnings.catch_warnings():  # (PEFT warns of the shared block's second path)
            warnings.simplefilter("ignore")
            loaded = lib.PeftModel.from_pretrained(cls(), str(tmp_path / other.__name__))
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), models[ref](x))

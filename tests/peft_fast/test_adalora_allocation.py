"""AdaLoRA's rank allocation in a training loop against PEFT 0.21.2, step by step: the loss (with the orthogonal
penalty), the weights after each optimizer step, the ranks masked by `update_and_allocate` through the warm-up,
budget and final phases, the rank pattern written into the config, and the files saved after allocation (only the
kept ranks, the pattern's keys without the adapter name), loaded back by either library."""
import warnings

import pytest
import torch
from lycoris_pairs import assert_same_files
from oft_adalora_pairs import SCHEDULE, AdaLoraConfig, cfg, pair, x_for
from tiny_models import assert_close, assert_same_state, base_model, impl, out, peft_fast_only, ref

STEPS = SCHEDULE["total_step"] + 1  # one step past the end: the final pattern is re-applied there


def _train(r, i, steps: int, kind: str = "llama", lr: float = 0.05, check=None) -> None:
    """SGD on the same batches in both models, update_and_allocate after each backward (PEFT's recipe), the
    losses, weights, masks and patterns compared at every step."""
    x = x_for(kind)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr) for m in (r, i)]
    for m in (r, i):
        m.train()
    for step in range(steps):
        losses = []
        for m, opt in zip((r, i), opts):
            torch.manual_seed(step)
            loss = m(**x, labels=x["input_ids"]).loss
            loss.backward()
            opt.step()
            m.update_and_allocate(step)  # through the PeftModel, as PEFT's __getattr__ allows
            opt.zero_grad()
            losses.append(loss.detach())
        assert_close(losses[1], losses[0], msg=f"loss, step {step}")
        assert_same_state(r, i, atol=1e-5, rtol=1e-4)
        zeros = [{n: (p.view(-1) == 0).nonzero().view(-1).tolist() for n, p in m.named_parameters() if ".lora_E." in n}
                 for m in (r, i)]
        assert zeros[1] == zeros[0], f"masked ranks, step {step}"
        assert i.peft_config["default"].rank_pattern == r.peft_config["default"].rank_pattern, f"pattern, {step}"
        if check is not None:
            check(step, r, i)


@pytest.mark.parametrize("overrides", [{}, {"deltaT": 2, "lora_dropout": 0.1}, {"target_modules": "all-linear"}],
                         ids=["default", "deltaT=2-dropout", "all-linear"])
def test_training_loop_allocates_as_peft(overrides):
    _, r, i = pair("adalora", "llama", task_type="CAUSAL_LM", **overrides)
    seen = {}

    def check(step, r, i):
        pattern = i.peft_config["default"].rank_pattern
        kept = None if pattern is None else sum(sum(v) for v in pattern.values())
        seen[step] = kept
        if step == SCHEDULE["total_step"] - SCHEDULE["tfinal"]:  # the final budget: target_r per layer
            assert kept == SCHEDULE["target_r"] * len(pattern)

    _train(r, i, STEPS, check=check)
    tinit, final = SCHEDULE["tinit"], SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    assert all(seen[s] is None for s in range(tinit + 1))  # warm-up: nothing masked yet
    kept = [seen[s] for s in range(tinit + 1, final + 1) if seen[s] is not None]
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]  # the budget shrinks
    assert seen[STEPS - 1] == seen[final]


def test_files_after_allocation(tmp_path):
    """Saved after allocation: only the kept ranks, the same files as PEFT's; both libraries load either file
    with the kept ranks only (and ranknum, the scale, unchanged) and give the trained model's outputs."""
    _, r, i = pair("adalora", "llama", task_type="CAUSAL_LM")
    _train(r, i, STEPS)
    i.load_state_dict(r.state_dict())  # equal to float rounding after training: make the files comparable bitwise
    x = x_for("llama")
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        want = out(r, x)
    r.save_pretrained(tmp_path / "ref")
    i.save_pretrained(tmp_path / "impl")
    assert_same_files(tmp_path / "impl", tmp_path / "ref")
    assert i.peft_config["default"].rank_pattern == r.peft_config["default"].rank_pattern  # keys truncated
    assert all(k.endswith(".lora_E") for k in i.peft_config["default"].rank_pattern)
    pattern = i.peft_config["default"].rank_pattern
    for src in ("ref", "impl"):
        for lib in (impl, ref):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = lib.PeftModel.from_pretrained(base_model("llama"), str(tmp_path / src))
            layer = loaded.base_model.model.model.layers[0].self_attn.q_proj
            kept = sum(pattern["model.layers.0.self_attn.q_proj.lora_E"])
            assert layer.lora_A["default"].shape[0] == kept == layer.r["default"]
            assert layer.ranknum["default"].item() == SCHEDULE["init_r"]
            with torch.no_grad():
                assert_close(out(loaded, x), want, msg=f"{src} -> {lib.__name__}")


def test_resume_training_with_a_loaded_pattern(tmp_path):
    """A saved, allocated adapter loaded with is_trainable=True trains on in both libraries alike; past the final
    step, re-applying its pattern to the loaded (already reduced) layers fails in PEFT 0.21.2 (a shape mismatch)
    and, a deliberate difference, changes nothing in peft_fast."""
    _, r, i = pair("adalora", "llama", task_type="CAUSAL_LM")
    _train(r, i, STEPS)
    r.save_pretrained(tmp_path)
    models = []
    for lib in (ref, impl):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models.append(lib.PeftModel.from_pretrained(base_model("llama"), str(tmp_path), is_trainable=True))
    x = x_for("llama")
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in models]
    for _ in range(2):
        losses = []
        for m, opt in zip(models, opts):
            m.train()
            loss = m(**x, labels=x["input_ids"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        assert_close(losses[1], losses[0])
    assert_same_state(*models)
    loss = models[0](**x, labels=x["input_ids"]).loss
    loss.backward()
    with pytest.raises(RuntimeError, match="size"):
        models[0].update_and_allocate(STEPS)
    if impl is not ref:
        loss = models[1](**x, labels=x["input_ids"]).loss
        loss.backward()
        before = {k: v.clone() for k, v in models[1].state_dict().items()}
        models[1].update_and_allocate(STEPS)
        assert all(torch.equal(before[k], v) for k, v in models[1].state_dict().items())


def test_allocation_needs_gradients():
    """update_and_allocate reads every AdaLoRA weight's gradient: without one both libraries refuse (PEFT with a
    TypeError from p * None, peft_fast naming the parameter and when to call it)."""
    _, r, i = pair("adalora", "llama")
    for m, exc in ((r, TypeError), (i, TypeError if impl is ref else ValueError)):
        with pytest.raises(exc):
            m.update_and_allocate(0)


@peft_fast_only
def test_allocation_without_a_trainable_adapter_is_refused(tmp_path):
    """A model loaded for inference has no rank allocator (PEFT fails with an AttributeError)."""
    _, r, _ = pair("adalora", "llama")
    r.save_pretrained(tmp_path)
    loaded = impl.PeftModel.from_pretrained(base_model("llama"), str(tmp_path))
    with pytest.raises(ValueError, match="trainable AdaLoRA adapter"):
        loaded.update_and_allocate(0)


def test_schedule_and_budget_match_peft():
    """The budget schedule (cubic decrease between tinit and total_step - tfinal) and the initial budget."""
    from peft.tuners.adalora.layer import RankAllocator as PeftAllocator

    _, r, i = pair("adalora", "llama", **{**SCHEDULE, "total_step": 40, "tinit": 5, "tfinal": 7, "deltaT": 3})
    ours, peft_alloc = i.base_model.rankallocator, r.base_model.rankallocator
    assert isinstance(peft_alloc, PeftAllocator)
    assert (ours.init_bgt, ours.target_bgt, ours.name_set) == (peft_alloc.init_bgt, peft_alloc.target_bgt,
                                                                peft_alloc.name_set)
    for step in range(45):
        assert ours.budget_schedule(step) == peft_alloc.budget_schedule(step), step


def test_config_checks_like_peft():
    for kw, words in (({"total_step": None}, ["total_step"]), ({"tinit": 8, "tfinal": 3}, ["budgeting phase"]),
                      ({"use_dora": True}, ["does not support DoRA"]), ({"orth_reg_weight": -1.0}, ["orth_reg"])):
        for cls in (AdaLoraConfig, ref.AdaLoraConfig):
            with pytest.raises(ValueError) as info:
                cls(**cfg("adalora", "llama", **kw))
            assert all(w in str(info.value) for w in words), info.value


def test_resize_by_rank_pattern_as_peft():
    """AdaLoraModel's public resizers: the modules reduced to the kept ranks (ranknum unchanged), and a state dict
    reduced the same way."""
    _, r, i = pair("adalora", "llama", task_type="CAUSAL_LM")
    _train(r, i, SCHEDULE["total_step"] - SCHEDULE["tfinal"] + 1)
    i.load_state_dict(r.state_dict())
    pattern = r.peft_config["default"].rank_pattern
    states = [m.base_model.resize_state_dict_by_rank_pattern(pattern, dict(m.state_dict()), "default") for m in (r, i)]
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[1][k], states[0][k]), k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in (r, i):
            m.base_model.resize_modules_by_rank_pattern(pattern, "default")
    assert_same_state(r, i, atol=0, rtol=0)
    layer = i.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_E["default"].shape[0] == sum(pattern["model.layers.0.self_attn.q_proj.lora_E.default"])
    x = x_for("llama")
    for m in (r, i):
        m.eval()
    with torch.no_grad():
        assert_close(out(i, x), out(r, x))

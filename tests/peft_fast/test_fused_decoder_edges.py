"""The fused decoder where a model is called or carried in less common ways: every call shape transformers accepts
gives the unfused result, and a fused model survives DataParallel's replicas, pickling and accelerate's hooks."""
import copy
import io

import pytest
import torch
from decoder_families import tiny_causal_lm
from tiny_models import peft_fast_only

import peft_fast
from peft_fast.fused import patching

pytestmark = peft_fast_only


def _pair(family="llama", **overrides):
    plain = tiny_causal_lm(family, **overrides)
    fast = peft_fast.fuse(copy.deepcopy(plain), "compile")
    return plain.train(), fast.train()


def _same(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


IDS = torch.randint(0, 211, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("call", ["eval", "logits_to_keep_tensor", "logits_to_keep_int", "positional"])
def test_calls_that_keep_the_logits_match_unfused(call):
    plain, fast = _pair()
    kw = {"labels": IDS}
    if call == "eval":
        plain.eval(), fast.eval()
    elif call == "logits_to_keep_tensor":  # every position, so that transformers' loss takes the labels
        kw["logits_to_keep"] = torch.arange(IDS.shape[1])
    elif call == "logits_to_keep_int":  # the last positions (no loss: transformers cannot match them to labels)
        kw = {"logits_to_keep": 4}
    want = plain(IDS, **kw) if call == "positional" else plain(input_ids=IDS, **kw)
    got = fast(IDS, **kw) if call == "positional" else fast(input_ids=IDS, **kw)
    if call == "positional":  # training with labels: the fused loss, reached through a positional input_ids
        assert got.logits is None
    else:
        _same(got.logits, want.logits)
    if want.loss is not None:
        _same(got.loss, want.loss)


def test_tuple_outputs_match_unfused_position_by_position():
    plain, fast = _pair()
    want = plain(input_ids=IDS, labels=IDS, return_dict=False)
    got = fast(input_ids=IDS, labels=IDS, return_dict=False)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if torch.is_tensor(b):
            _same(a, b)


def test_a_models_own_loss_function_is_kept():
    plain, fast = _pair()
    custom = lambda logits, labels, **kw: logits.float().pow(2).mean()  # noqa: E731
    plain.loss_function = custom
    fast.loss_function = custom
    _same(fast(input_ids=IDS, labels=IDS).loss, plain(input_ids=IDS, labels=IDS).loss)


def test_a_head_with_a_bias_or_hooks_keeps_the_unfused_loss():
    plain, fast = _pair()
    bias = torch.randn(211)
    for m in (plain, fast):
        head = torch.nn.Linear(64, 211, bias=True)
        head.weight.data.copy_(m.lm_head.weight)
        head.bias.data.copy_(bias)
        m.lm_head = head
    assert fast(input_ids=IDS, labels=IDS).logits is not None
    _same(fast(input_ids=IDS, labels=IDS).loss, plain(input_ids=IDS, labels=IDS).loss)
    plain, fast = _pair()
    fast.lm_head.register_forward_pre_hook(lambda mod, args: None)  # as FSDP2 or ZeRO-3 gather a sharded head
    assert fast(input_ids=IDS, labels=IDS).logits is not None


def test_final_logit_softcapping_applies_only_where_the_family_uses_it():
    plain, fast = _pair("llama", final_logit_softcapping=2.0)  # Llama's config may carry it; its model ignores it
    _same(fast(input_ids=IDS, labels=IDS).loss, plain(input_ids=IDS, labels=IDS).loss)


def test_data_parallel_replicas_run_fused_on_their_own_weights():
    _, fast = _pair()
    norm = fast.model.norm
    replica = norm._replicate_for_data_parallel()  # what nn.DataParallel makes on each device
    assert patching.part_of(replica) == "rms_norm"
    replica.weight = torch.nn.Parameter(norm.weight.detach() * 2)
    x = torch.randn(2, 3, 64)
    _same(replica(x), 2 * norm(x))


def test_pickling_keeps_the_fused_classes_and_outputs():
    plain, fast = _pair("qwen2")
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert peft_fast.fused_parts(loaded) == peft_fast.fused_parts(fast)
    assert type(loaded.model.norm).__name__ == "Qwen2RMSNorm"  # config.json's architectures stay the model's
    assert isinstance(loaded.model.norm, patching.base_class(type(fast.model.norm)))
    _same(loaded(input_ids=IDS, labels=IDS).loss, plain(input_ids=IDS, labels=IDS).loss)


def test_accelerate_hooks_call_the_fused_forward_and_unfuse_restores_theirs():
    accelerate = pytest.importorskip("accelerate")
    plain, fast = _pair()
    fast = peft_fast.unfuse(fast)
    accelerate.cpu_offload(fast, execution_device=torch.device("cpu"))
    want = plain(input_ids=IDS, labels=IDS).loss
    peft_fast.fuse(fast, "compile")
    norm = fast.model.norm
    assert norm._old_forward.__func__ is type(norm).forward  # the hook now calls the fused forward
    _same(fast(input_ids=IDS, labels=IDS).loss, want)
    peft_fast.unfuse(fast)
    assert norm._old_forward.__func__ is type(norm).forward and not patching.part_of(norm)
    _same(fast(input_ids=IDS, labels=IDS).loss, want)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_mixtures_of_experts_keep_their_router_loss(family):
    """With output_router_logits the loss adds the router's balancing loss: the logits path stays, loss included."""
    plain, fast = _pair(family, output_router_logits=True)
    want, got = plain(input_ids=IDS, labels=IDS), fast(input_ids=IDS, labels=IDS)
    assert got.logits is not None and got.aux_loss is not None
    _same(got.loss, want.loss)
    plain.config.output_router_logits = fast.config.output_router_logits = False
    got = fast(input_ids=IDS, labels=IDS)  # no router loss: the fused loss, in the mixture of experts' output type
    assert got.logits is None and type(got).__name__ == "MoeCausalLMOutputWithPast"
    _same(got.loss, plain(input_ids=IDS, labels=IDS).loss)


def test_a_module_that_cannot_be_fused_stays_unfused_with_a_warning(monkeypatch):
    """get_peft_model(fused=...) has injected the adapters by then: a failing part must not fail the whole call."""
    real = patching.fused_class

    def broken(base, part, backend, detail):
        if part == "rope":
            raise RuntimeError("no rotary embedding here")
        return real(base, part, backend, detail)

    monkeypatch.setattr(patching, "fused_class", broken)
    with pytest.warns(UserWarning, match="MistralAttention stays unfused"):
        fast = peft_fast.get_peft_model(tiny_causal_lm("mistral"), peft_fast.LoraConfig(target_modules=["q_proj"]),
                                        fused="compile")
    assert "rope" not in peft_fast.fused_parts(fast) and peft_fast.fused_parts(fast)["rms_norm"] == 5


def test_gemma3_soft_capping_when_its_config_sets_it():
    """Gemma 3's config has no final soft-capping by default (the family test's model): set, the fused loss caps."""
    plain, fast = _pair("gemma3", final_logit_softcapping=2.0)
    assert fast(input_ids=IDS, labels=IDS).logits is None  # the fused loss ran
    _same(fast(input_ids=IDS, labels=IDS).loss, plain(input_ids=IDS, labels=IDS).loss)


def test_a_llama_shaped_family_outside_the_list_stays_unfused():
    """Granite's modules have Llama's shapes (RMSNorm, gate/up/down MLP, *ForCausalLM) but it scales its logits: a
    family not on the list stays unfused, with the warning, and gives its own loss."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    plain = GraniteForCausalLM(GraniteConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                             num_key_value_heads=2, num_hidden_layers=2, vocab_size=211,
                                             max_position_embeddings=64, logits_scaling=4.0)).train()
    fast = copy.deepcopy(plain)
    with pytest.warns(UserWarning, match="fuses the decoders of llama"):
        peft_fast.fuse(fast, "compile")
    assert not peft_fast.fused_parts(fast)
    torch.testing.assert_close(fast(input_ids=IDS, labels=IDS).loss, plain(input_ids=IDS, labels=IDS).loss)


@pytest.mark.parametrize("off", [None, False])
def test_fuse_with_no_backend_unfuses(off):
    model = tiny_causal_lm("llama")
    classes = [type(m) for m in model.modules()]
    peft_fast.fuse(model, "compile")
    assert peft_fast.fused_parts(model)
    assert peft_fast.fuse(model, off) is model
    assert not peft_fast.fused_parts(model) and [type(m) for m in model.modules()] == classes


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_the_norms_take_the_models_own_epsilon(family):
    """rms_norm_eps far from every default (0.5): the fused norm reads the module's epsilon."""
    plain, fast = _pair(family, rms_norm_eps=0.5)
    assert "rms_norm" in peft_fast.fused_parts(fast)
    _same(fast.eval()(input_ids=IDS).logits, plain.eval()(input_ids=IDS).logits)


def test_a_second_backward_through_a_fused_lora_model_works_as_unfused():
    """retain_graph=True, then another backward: AOTAutograd's donated buffers would refuse it in the compiled norms
    and activations once the base weights are frozen (LoRA); the unfused model takes it."""
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"])
    plain = peft_fast.get_peft_model(tiny_causal_lm("llama"), peft_fast.LoraConfig(**cfg))
    fast = peft_fast.get_peft_model(copy.deepcopy(plain.base_model.model), peft_fast.LoraConfig(**cfg), fused="compile")
    fast.load_state_dict(plain.state_dict())
    grads = []
    for model in (plain.train(), fast.train()):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward(retain_graph=True)
        loss.backward()  # the gradients of two backwards, summed
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        _same(grads[1][name], grads[0][name])
    norm = copy.deepcopy(fast.base_model.model.model.norm)  # a frozen fused norm on its own, at a new shape
    x = torch.randn(2, 3, 64, requires_grad=True)
    y = norm(x).sum()
    y.backward(retain_graph=True)
    y.backward()


def test_the_fused_loss_refuses_a_second_differentiation():
    """Its gradients are computed in forward: create_graph=True could not differentiate them again, so a second
    derivative through it is refused rather than silently missing its dependence on the hidden states. (The
    compiled norms refuse it too, with torch.compile's own error.)"""
    from peft_fast.fused import loss as loss_ops

    h = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64)
    loss = loss_ops.linear_cross_entropy(h, w, torch.randint(0, 11, (6,)))
    for upstream in (loss, loss * loss):  # a constant upstream gradient, and one that records a graph
        (g,) = torch.autograd.grad(upstream, h, create_graph=True, retain_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            g.pow(2).sum().backward()


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_q_and_k_norms_do_not_exhaust_the_layer_norms_recompile_limit(family):
    """Qwen3 and Gemma 3 normalise q and k per head ([..., heads, head_dim]) with the layer norms' class: one
    compiled copy per rank and size keeps training steps, eval and a generate within dynamo's recompile limit (at
    which the norms would silently run unfused for every model of the class)."""
    import logging

    lora = dict(r=4, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"])  # some norm inputs require grad
    fast = peft_fast.get_peft_model(tiny_causal_lm(family), peft_fast.LoraConfig(**lora), fused="compile")
    torch._dynamo.reset()
    hits = []

    class _Hits(logging.Handler):
        def emit(self, record):
            if "recompile_limit" in record.getMessage():
                hits.append(record.getMessage())

    handler = _Hits()
    loggers = [logging.getLogger(n) for n in ("torch._dynamo", "torch._dynamo.convert_frame")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        for length in (9, 14, 23, 17):
            ids = torch.randint(0, 211, (2, length))
            fast(input_ids=ids, labels=ids).loss.backward()
        fast.eval()
        with torch.no_grad():
            fast(input_ids=ids)
        fast.generate(input_ids=ids[:, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert not hits, hits  # dynamo logs each function that reached the limit


def test_the_fused_attention_reads_the_modeling_modules_globals_as_they_are_now(monkeypatch):
    """A later patch of the modeling module (here its attention function) reaches a fused model, fused before or
    after the patch, as it reaches the unfused one."""
    import transformers.models.llama.modeling_llama as modeling

    plain = tiny_causal_lm("llama")
    plain.config._attn_implementation = "eager"
    before = peft_fast.fuse(copy.deepcopy(plain), "compile")
    calls = []
    original = modeling.eager_attention_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling, "eager_attention_forward", spy)
    after = peft_fast.fuse(copy.deepcopy(plain), "compile")
    counts = []
    for model in (plain, before, after):
        calls.clear()
        model.eval()(input_ids=IDS[:1, :5])
        counts.append(len(calls))
    assert counts == [2, 2, 2]  # one call per decoder layer


def test_a_task_less_adapter_saved_from_a_fused_model_names_the_transformers_class(tmp_path):
    """auto_mapping (what AutoPeftModel rebuilds a task-less adapter's base from) names the class the fused one
    stands for, in transformers' module."""
    import json

    model = peft_fast.get_peft_model(tiny_causal_lm("llama"), peft_fast.LoraConfig(r=2, target_modules=["q_proj"]),
                                     fused="compile")
    model.save_pretrained(tmp_path)
    mapping = json.loads((tmp_path / "adapter_config.json").read_text())["auto_mapping"]
    assert mapping == {"base_model_class": "LlamaForCausalLM",
                       "parent_library": "transformers.models.llama.modeling_llama"}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_fused_model_compiled_before_any_eager_call_is_one_graph(family):
    """Trainer with torch_compile=True compiles before any eager step: the norms' compiled copies (made per rank and
    size on their first eager call) must not be made inside the trace, a graph break fullgraph=True refuses. The
    norm's class gets a fresh name, so no copy exists yet, whatever ran before in this process."""
    base = tiny_causal_lm(family)
    for module in base.modules():
        if type(module).__name__.endswith("RMSNorm"):
            fresh = type(type(module).__name__, (type(module),), {"__module__": type(module).__module__})
            module.__class__ = fresh
    fast = peft_fast.fuse(base, "compile").eval()
    assert peft_fast.fused_parts(fast)["rms_norm"] > 0
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(fast, backend="eager", fullgraph=True)(input_ids=IDS).logits
        want = fast(input_ids=IDS).logits
    _same(got, want)

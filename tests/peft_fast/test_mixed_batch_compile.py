"""torch.compile with mixed adapter batches: eager's outputs, one graph break (where the names become the batch
plan, outside the traced code), and no recompilation when the mix of adapters changes at the same batch shape;
single-adapter and adapter-disabled forwards compile whole (fullgraph), also after eager calls filled the caches."""
import importlib
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

import peft_fast
from switches import use_settings
from tiny_models import AGAINST_PEFT, assert_close, base_model, default_cfg

pytestmark = pytest.mark.skipif(AGAINST_PEFT, reason="peft_fast's compiled mixed batches (PEFT breaks per adapter)")
MIXES = [["a", "b", "__base__", "a"], ["b", "b", "a", "__base__"], ["a", "a", "a", "a"], ["__base__"] * 4]


def _other(kind: str):
    """A config of another adapter type (LoHa, OFT), whose layers split mixed batches by name eagerly."""
    if kind == "loha":
        return peft_fast.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False)
    return peft_fast.OFTConfig(r=0, oft_block_size=16, target_modules=["q_proj", "v_proj"], init_weights=False)


def _model(kind="lora"):
    base = base_model("llama")
    if kind == "nf4":
        base = peft_fast.quantize(base)
    if kind in ("loha", "oft"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            model = peft_fast.get_peft_model(base, _other(kind), adapter_name="a")
            model.add_adapter("b", _other(kind))
        return model.eval()
    cfg = dict(use_dora=kind == "dora")
    if kind == "tokens":  # the embedding's rows, split by name outside the graph
        cfg["trainable_token_indices"] = [1, 5, 7]
    if kind == "embed":
        cfg["target_modules"] = ["q_proj", "embed_tokens"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = peft_fast.get_peft_model(base, peft_fast.LoraConfig(**default_cfg("llama", **cfg)), adapter_name="a")
        if kind == "mts":  # "b" alone trains its own lm_head: the rows are split by name outside the graph
            cfg["modules_to_save"] = ["lm_head"]
        model.add_adapter("b", peft_fast.LoraConfig(**default_cfg("llama", **cfg)))
        if kind == "mts":
            with torch.no_grad():
                model.base_model.model.lm_head.modules_to_save["b"].weight.mul_(1.5)
    return model.eval()


def _ids():
    return torch.randint(1, 128, (4, 6), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def fresh():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _breaks() -> dict:
    return {reason.split("\n")[0]: n for reason, n in counters["graph_break"].items()}


@pytest.mark.parametrize("kind", ["lora", "dora", "nf4", "mts", "tokens", "embed", "loha", "oft"])
def test_a_new_mix_reuses_the_compiled_graph(fresh, kind):
    model, ids, cnt = _model(kind), _ids(), CompileCounter()
    compiled = torch.compile(model, backend=cnt)
    with torch.no_grad():
        for i, mix in enumerate(MIXES):
            assert_close(compiled(input_ids=ids, adapter_names=mix).logits,
                         model(input_ids=ids, adapter_names=mix).logits, msg=str(mix))
            if i == 0:
                graphs = cnt.frame_count
    assert cnt.frame_count == graphs, f"a new mix recompiled: {graphs} graphs after the first call, then " \
                                      f"{cnt.frame_count}"
    breaks = _breaks()
    assert list(breaks) == ["Skip inlining `torch.compiler.disable()`d function"], breaks


def test_the_recompile_count_can_fail(fresh):
    """Control: the same count sees a recompile per mix when traced code reads the names."""
    model, ids, cnt = _model(), _ids(), CompileCounter()

    def leaky(ids, names):
        scale = 2.0 if names[0] == "a" else 3.0  # a guard on the names' values
        return model(input_ids=ids, adapter_names=names).logits * scale

    compiled = torch.compile(leaky, backend=cnt)
    with torch.no_grad():
        for mix in MIXES[:3]:
            compiled(ids, mix)
    assert cnt.frame_count > 1


def test_triton_mixed_batches_compile_once(fresh, monkeypatch):
    use_settings(monkeypatch, backend="triton")
    model, ids, cnt = _model(), _ids(), CompileCounter()
    compiled = torch.compile(model, backend=cnt)
    with torch.no_grad():
        for i, mix in enumerate(MIXES[:3]):
            assert_close(compiled(input_ids=ids, adapter_names=mix).logits,
                         model(input_ids=ids, adapter_names=mix).logits, atol=1e-4, rtol=1e-4, msg=str(mix))
            graphs = cnt.frame_count if i == 0 else graphs
    assert cnt.frame_count == graphs


@pytest.mark.parametrize("kind", ["lora", "dora", "nf4"])
def test_single_adapter_and_disabled_forwards_compile_whole(fresh, kind):
    """fullgraph=True: no graph break at all, also after eager calls (whose caches compare storage addresses,
    which traced code must not)."""
    model, ids = _model(kind), _ids()
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        model(input_ids=ids, adapter_names=MIXES[0])  # eager mixed batch: stacks and caches filled
        compiled = torch.compile(lambda i: model(input_ids=i).logits, fullgraph=True, backend="eager")
        assert_close(compiled(ids), eager)
        with model.disable_adapter():
            assert_close(compiled(ids), model(input_ids=ids).logits)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_static_cache_generate_compiles_once_across_mixes(fresh, backend, monkeypatch):
    """transformers' static-cache generate with the decoder's forward compiled (as a server would, with
    mode="reduce-overhead" on a GPU): each mix gives eager's tokens, and after the first generate a new mix of
    adapters at the same batch shape compiles nothing new."""
    use_settings(monkeypatch, backend=backend)
    model, ids, cnt = _model(), _ids(), CompileCounter()
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = [model.generate(input_ids=ids, adapter_names=mix, **kw) for mix in MIXES]
        inner = model.get_base_model()
        inner.forward = torch.compile(inner.forward, backend=cnt)
        try:
            got = [model.generate(input_ids=ids, adapter_names=MIXES[0], **kw)]
            graphs = cnt.frame_count
            got += [model.generate(input_ids=ids, adapter_names=mix, **kw) for mix in MIXES[1:]]
        finally:
            del inner.forward  # the class's forward again
    for mix, g, w in zip(MIXES, got, want):
        assert torch.equal(g, w), mix
    assert len({tuple(g[:, ids.shape[1]:].flatten().tolist()) for g in got}) > 1  # the mixes matter
    assert 0 < graphs == cnt.frame_count, f"{graphs} graphs after the first generate, then {cnt.frame_count}"
    assert not counters["graph_break"], _breaks()


def test_compiled_layers_share_the_batch_plan(fresh, monkeypatch):
    """On the CPU reference, a compiled forward plans a batch as often as an eager one (once per kind of layer),
    not once per layer: the compiled graph's layers get the batch's metadata back (kernels/multi_lora.py)."""
    module = importlib.import_module("peft_fast.kernels.multi_lora")
    plans = []
    real = module.bucket_plan
    monkeypatch.setattr(module, "bucket_plan", lambda *a: plans.append(1) or real(*a))
    model, ids, mix = _model(), _ids(), ["a", "b", "__base__", "b"]  # two adapters of one rank: batched
    layers = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
    with torch.no_grad():
        want = model(input_ids=ids, adapter_names=mix).logits
        eager = len(plans)
        plans.clear()
        got = torch.compile(model, backend="eager")(input_ids=ids, adapter_names=mix).logits
    assert_close(got, want)
    assert 0 < eager < layers and len(plans) == eager, (eager, len(plans), layers)


@pytest.mark.parametrize("kind", ["lora", "dora", "nf4"])
def test_adding_adapters_recompiles_only_when_the_slots_double(fresh, kind):
    """A server adding adapters to a compiled model: its layers' slots grow by doubling (1, 2, 4, 8, ...), and only
    a doubling compiles anew, not each adapter nor a deletion. Outputs stay eager's (the newest adapters in the
    mix, and one in a slot a deleted adapter left)."""
    model, ids, cnt = _model(kind), _ids(), CompileCounter()
    cfg = peft_fast.LoraConfig(**default_cfg("llama", use_dora=kind == "dora", init_lora_weights=False))
    compiled = torch.compile(model, backend=cnt)
    names, counts = ["a", "b"], []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(9):  # 2, 3, ..., 9 adapters, then one deleted: 8
            mix = [names[-1], names[0], "__base__", names[-2]]
            assert_close(compiled(input_ids=ids, adapter_names=mix).logits,
                         model(input_ids=ids, adapter_names=mix).logits, msg=f"{len(names)} adapters")
            counts.append(cnt.frame_count)
            if step == 7:
                model.delete_adapter(names.pop(1))  # a hole in the slot table
            else:
                names.append(f"x{step}")
                torch.manual_seed(step)
                model.add_adapter(names[-1], cfg)
    g = counts[0]
    # 2 adapters: compiled once; 3 (4 slots), 5 (8 slots) and 9 (16 slots) compile again; 4, 6, 7, 8 adapters and
    # the deletion do not
    assert counts == [g, 2 * g, 2 * g, 3 * g, 3 * g, 3 * g, 3 * g, 4 * g, 4 * g], counts


def test_new_batch_shapes_go_dynamic_instead_of_recompiling_each(fresh):
    """A server's prompts come in every length and batch size: after the second shape the compiled mixed forward is
    dynamic, a few graphs in all (one per tile size of the batched kernels), where it used to compile one per shape
    and run eagerly past dynamo's recompile limit. (The outer frames that only hand the names to the batch plan
    make no graph; they guard on the names' number, and recompile per batch size, without a graph.)"""
    model, cnt = _model(), CompileCounter()
    compiled = torch.compile(model, backend=cnt)
    shapes = [(4, s) for s in range(5, 12)] + [(b, 6) for b in (1, 2, 3, 5, 7, 9)]
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
        for b, s in shapes:
            ids = torch.randint(1, 128, (b, s), generator=torch.Generator().manual_seed(b * 100 + s))
            mix = (MIXES[0] * 3)[:b]
            assert_close(compiled(input_ids=ids, adapter_names=mix).logits,
                         model(input_ids=ids, adapter_names=mix).logits, msg=f"{b}x{s}")
    # the first shape, each dimension going dynamic, batch size 1 (dynamo specializes 0 and 1), a tile size per
    # range of tokens per slot: 6 here; 13 (one per shape) when a guard pinned the batch's sizes
    assert cnt.frame_count <= 7, cnt.frame_count

"""peft_fast.offload_checkpoints: the inputs gradient checkpointing keeps leave the device between forward and
backward, and nothing else changes.

On a CPU there is no device memory to free, so the CPU tests put "cpu" among the offloaded device types: the "host
copy" is then a clone, and a checkpointed layer's input is freed exactly when the offload took it over, which the
tests see through storage weak references. Losses and gradients must be bitwise those of checkpointing without the
offload (the bytes come back as they left), for peft_fast and PEFT models, both torch checkpoint variants, and
decoder families with different layer signatures. The GPU test measures the memory it frees.
"""
import copy
import gc
import threading
import warnings

import peft
import pytest
import torch
from decoder_families import tiny_causal_lm
from switches import hub_kernels_checkpointing
from tiny_models import peft_fast_only
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.checkpoint import checkpoint

import peft_fast
from peft_fast import offload

pytestmark = peft_fast_only
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(offload, "DEVICE_TYPES", {"cpu", "cuda"})


def _model(lib=peft_fast, family="llama", reentrant=False, checkpointing=True, layers=3, device="cpu",
           dtype=torch.float32, **config):
    base = tiny_causal_lm(family, num_hidden_layers=layers, dtype=dtype, **config).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            base.enable_input_require_grads()  # reentrant checkpointing needs inputs that require grad
        model = lib.get_peft_model(base, lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                        lora_dropout=0.1, init_lora_weights=False))
    return model.train()


def _layers(model):
    return next(m for m in model.modules() if isinstance(m, nn.ModuleList))


def _step(model, ids, seed=1):
    """Loss, gradients, and whether each layer's input storage outlived the forward."""
    refs = []
    handles = [layer.register_forward_pre_hook(lambda m, a: refs.append(StorageWeakRef(a[0].untyped_storage())))
               for layer in _layers(model)]
    torch.manual_seed(seed)  # dropout: the recomputation must replay it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = model(input_ids=ids, labels=ids).loss
    alive = [not r.expired() for r in refs]
    loss.backward()
    for h in handles:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, alive


def _ids(vocab=211, shape=(2, 24), device="cpu"):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0)).to(device)


def _same(a, b, tol=0.0):
    (la, ga, _), (lb, gb, _) = a, b
    torch.testing.assert_close(la, lb, rtol=tol, atol=tol)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=tol, atol=tol, msg=k)


@pytest.mark.parametrize("lib", [peft_fast, peft], ids=["peft_fast", "peft"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2_moe"])
def test_same_step_and_inputs_leave(on_cpu, lib, reentrant, family):
    ids = _ids()
    control = _step(_model(lib, family, reentrant), ids)
    model = peft_fast.offload_checkpoints(_model(lib, family, reentrant), min_bytes=0)
    assert len(peft_fast.offloaded_scopes(model)) == 1
    got = _step(model, ids)
    _same(control, got)
    # Without the offload the checkpoint holds every layer's input; with it, each is freed once its host copy is
    # made. Layer 0's input (the embeddings made to require grad) is an autograd leaf, which autograd itself holds.
    assert all(control[2])
    assert got[2][0] and not any(got[2][1:])


def test_off_without_checkpointing_in_eval_and_no_grad(on_cpu, monkeypatch):
    packs = []
    real = offload._Session.pack
    monkeypatch.setattr(offload._Session, "pack", lambda self, t: packs.append(1) or real(self, t))
    ids = _ids()
    model = peft_fast.offload_checkpoints(_model(checkpointing=False), min_bytes=0)
    control = _step(_model(checkpointing=False), ids)
    with pytest.warns(UserWarning, match="gradient checkpointing is off"):
        model(input_ids=ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        model(input_ids=ids)
    _same(control, _step(model, ids))
    assert not packs
    model = peft_fast.offload_checkpoints(_model(), min_bytes=0)
    with torch.no_grad():
        model(input_ids=ids)
    model.eval()
    with torch.enable_grad():
        model(input_ids=ids).logits.sum().backward()
    assert not packs
    model.train()
    _step(model, ids)
    assert packs


@pytest.mark.parametrize("which", ["kept", "layer left unchecked", "control: packed as itself"])
def test_what_stays_makes_no_reference_cycle(which):
    """A saved-tensor hook that packs a tensor as itself makes a cycle through an op's saved output (the output
    holds its grad_fn, which holds the output): freed only by the garbage collector. No backward here: it would free
    the saved tensors and hide the cycle. The control packs as itself and must keep the storage alive."""
    session = offload._Session(min_bytes=1 << 40)
    pack, unpack = {"kept": (session.pack, session.unpack), "layer left unchecked": (offload._keep, offload._same),
                    "control: packed as itself": (lambda t: t, offload._same)}[which]
    x = torch.randn(1000, requires_grad=True)
    gc.collect()
    gc.disable()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            y = x.exp()  # exp saves its output
        ref = StorageWeakRef(y.untyped_storage())
        del y
        assert ref.expired() == (not which.startswith("control"))
    finally:
        gc.enable()
        gc.collect()


def test_parameters_and_leaves_stay(on_cpu):
    session = offload._Session(min_bytes=0)
    w = nn.Parameter(torch.randn(8, 8))
    leaf = torch.randn(4, 8, requires_grad=True)
    h = leaf * 2
    assert not isinstance(session.pack(w), offload._Offloaded)
    assert not isinstance(session.pack(w.t()), offload._Offloaded)  # what nn.Linear saves: a view
    assert not isinstance(session.pack(nn.Parameter(torch.randn(3), requires_grad=False)), offload._Offloaded)
    assert not isinstance(session.pack(leaf), offload._Offloaded)  # autograd's AccumulateGrad holds it anyway
    box = session.pack(h)
    assert isinstance(box, offload._Offloaded) and session.pack(h) is box  # saved twice, offloaded once
    h.mul_(3)  # changed in place between two saves: the second is a new copy
    again = session.pack(h)
    assert again is not box and torch.equal(session.unpack(again), h) and torch.equal(session.unpack(box) * 3, h)


@pytest.mark.parametrize("guard", [True, False], ids=["unchecked_layers_guarded", "control"])
def test_layers_left_unchecked_keep_their_activations(on_cpu, monkeypatch, guard):
    """transformers' every_n_layers checkpoints some layers only: the others keep what they save on the device.
    (The control, without that guard, shows the check can fail: their MLP activations would be offloaded.)"""
    packs = []
    real = offload._Session.pack
    monkeypatch.setattr(offload._Session, "pack", lambda self, t: packs.append(tuple(t.shape)) or real(self, t))
    if not guard:
        monkeypatch.setattr(offload._Scope, "enter_layer", lambda self, layer, args: offload._open().append(
            (layer, None, None)))
    ids = _ids()
    control = _step(_model(layers=4), ids)
    model = _model(layers=4)
    for i, layer in enumerate(_layers(model)):
        layer.gradient_checkpointing = i % 2 == 0
    peft_fast.offload_checkpoints(model, min_bytes=0)
    got = _step(model, ids)
    _same(control, got)
    mlp_wide = [s for s in packs if s[-1] == 96]  # intermediate_size: saved inside an MLP only
    assert (not mlp_wide) == guard, packs
    assert packs.count(tuple(ids.shape) + (64,)) >= 2  # the checkpointed layers' inputs did leave


def test_checkpointing_enabled_later_turns_it_on(on_cpu):
    """Trainer enables checkpointing when training starts, after the model was built and offloaded."""
    ids = _ids()
    control = _step(_model(), ids)
    model = peft_fast.offload_checkpoints(_model(checkpointing=False), min_bytes=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    got = _step(model, ids)
    _same(control, got)
    assert not any(got[2][1:])


def test_min_bytes(on_cpu):
    ids = _ids()
    hidden_bytes = ids.numel() * 64 * 4  # [2, 24, 64] float32
    kept = _step(peft_fast.offload_checkpoints(_model(), min_bytes=hidden_bytes + 1), ids)
    assert all(kept[2])
    moved = _step(peft_fast.offload_checkpoints(_model(), min_bytes=hidden_bytes), ids)
    assert not any(moved[2][1:])
    _same(kept, moved)


def test_disable_and_enable_again(on_cpu):
    ids = _ids()
    model = _model()
    scope = _layers(model)
    owner = next(m for m in model.modules() if any(c is scope for c in m.children()))
    hooks = len(owner._forward_pre_hooks), len(owner._forward_hooks)
    peft_fast.offload_checkpoints(model, min_bytes=0)
    peft_fast.offload_checkpoints(model, min_bytes=0)  # once, not twice
    assert (len(owner._forward_pre_hooks), len(owner._forward_hooks)) == (hooks[0] + 1, hooks[1] + 1)
    assert not any(_step(model, ids)[2][1:])
    peft_fast.offload_checkpoints(model, False)
    assert (len(owner._forward_pre_hooks), len(owner._forward_hooks)) == hooks
    assert peft_fast.offloaded_scopes(model) == []
    assert all(_step(model, ids)[2])


def test_deep_copies_offload_on_their_own(on_cpu):
    ids = _ids()
    model = peft_fast.offload_checkpoints(_model(layers=4), min_bytes=0)
    twin = copy.deepcopy(model)
    for i, layer in enumerate(_layers(twin)):  # and the copy's unchecked layers keep theirs
        layer.gradient_checkpointing = i % 2 == 0
    assert len(peft_fast.offloaded_scopes(twin)) == 1
    _same(_step(model, ids), _step(twin, ids))
    # inputs of layers 1 and 3 (unchecked) are kept by those layers; layer 2's (checkpointed) leaves
    assert _step(twin, ids)[2] == [True, True, False, True]
    peft_fast.offload_checkpoints(twin, False)
    assert all(_step(twin, ids)[2]) and not any(_step(model, ids)[2][1:])


def test_failed_forward_leaves_no_hooks_behind(on_cpu, monkeypatch):
    packs = []
    real = offload._Session.pack
    monkeypatch.setattr(offload._Session, "pack", lambda self, t: packs.append(1) or real(self, t))
    model = peft_fast.offload_checkpoints(_model(), min_bytes=0)

    def boom(module, args):
        raise RuntimeError("boom")

    handle = _layers(model)[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        model(input_ids=_ids())
    handle.remove()
    assert offload._open() == []
    packs.clear()
    a = torch.randn(64, requires_grad=True)
    (a * torch.randn(64)).sum().backward()  # autograd outside the model: nothing offloaded
    assert not packs
    assert not any(_step(model, _ids())[2][1:])


def test_other_threads_are_not_offloaded(on_cpu, monkeypatch):
    """While one thread is paused inside an offloaded forward, another thread sees none of its open layers: the
    other thread's plain autograd saves stay its own, and a whole offloaded step it runs meanwhile is bitwise that
    step run alone. The paused step then finishes with its inputs offloaded."""
    packs = []
    real = offload._Session.pack
    monkeypatch.setattr(offload._Session, "pack",
                        lambda self, t: packs.append(threading.current_thread().name) or real(self, t))
    ids = _ids()
    model = peft_fast.offload_checkpoints(_model(), min_bytes=0)
    other = peft_fast.offload_checkpoints(_model(), min_bytes=0)
    alone = _step(other, ids)
    packs.clear()
    inside, done = threading.Event(), threading.Event()

    def wait(module, args):
        inside.set()
        assert done.wait(30)

    handle = _layers(model)[1].register_forward_pre_hook(wait)
    results, errors = [], []

    def train():
        try:
            results.append(_step(model, ids))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    worker = threading.Thread(target=train, name="trainer")
    worker.start()
    try:
        assert inside.wait(30)
        assert offload._open() == []  # the trainer's open layer is its own
        a = torch.randn(64, requires_grad=True)
        (a * torch.randn(64)).sum().backward()
        assert threading.current_thread().name not in packs
        _same(alone, _step(other, ids))
        assert offload._open() == []
    finally:
        done.set()
        worker.join(30)
        handle.remove()
    assert not errors and len(results) == 1
    _, _, alive = results[0]
    assert alive[0] and not any(alive[1:])  # as in test_same_step_and_inputs_leave


def test_prefetches_the_next_layer(on_cpu, monkeypatch):
    events = []
    monkeypatch.setattr(offload._Offloaded, "prefetch", lambda self: events.append(("prefetch", self.index)))
    take = offload._Offloaded.take
    monkeypatch.setattr(offload._Offloaded, "take", lambda self: events.append(("take", self.index)) or take(self))
    _step(peft_fast.offload_checkpoints(_model(layers=4), min_bytes=0), _ids())
    firsts = list(dict.fromkeys(i for kind, i in events if kind == "take"))
    # The backward wants the offloads newest first (a tensor two nodes saved comes back twice), and each one's copy
    # has started before it is wanted, except the first's; no copy starts for one already back.
    assert firsts == sorted(firsts, reverse=True) and firsts[-1] == 0 and len(firsts) >= 4
    for i in firsts[1:]:
        assert ("prefetch", i) in events[:events.index(("take", i))], i
    used, ahead = set(), set()
    for kind, i in events:
        if kind == "take":
            used.add(i)
            ahead.discard(i)
        else:
            assert i not in used
            ahead.add(i)
        assert len(ahead) <= 1, events  # one copy on its way back at a time


def test_compiled_step_keeps_one_graph(on_cpu):
    from torch._dynamo.testing import CompileCounterWithBackend

    ids = _ids()
    model = _model(layers=2, checkpointing=False)
    base = model.base_model.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.disable_input_require_grads()  # its requires_grad_ call is a graph break of its own (test_compiled_training)
    peft_fast.offload_checkpoints(model, min_bytes=0)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()

    @torch.compile(backend=counter, fullgraph=True)
    def loss_of(ids):
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    torch.manual_seed(1)
    eager = model(input_ids=ids, labels=ids, use_cache=False).loss
    torch.manual_seed(1)
    with hub_kernels_checkpointing(model):
        loss = loss_of(ids)
    loss.backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    assert offload._open() == []


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return x


def test_explicit_modules_for_other_models(on_cpu):
    torch.manual_seed(0)
    x = torch.randn(8, 32)

    def run(model):
        refs = []
        handles = [b.register_forward_pre_hook(lambda m, a: refs.append(StorageWeakRef(a[0].untyped_storage())))
                   for b in model.blocks]
        y = model(x.clone().requires_grad_())
        alive = [not r.expired() for r in refs]
        y.square().sum().backward()
        for h in handles:
            h.remove()
        return [p.grad.clone() for p in model.parameters()], alive

    torch.manual_seed(1)
    control = _Stack()
    model = _Stack()
    model.load_state_dict(control.state_dict())
    with pytest.raises(ValueError, match="modules="):
        peft_fast.offload_checkpoints(model)
    assert peft_fast.offloaded_scopes(model) == []
    with pytest.raises(ValueError, match="submodules of the model"):
        peft_fast.offload_checkpoints(model, modules=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="min_bytes"):
        peft_fast.offload_checkpoints(model, min_bytes=-1)
    assert peft_fast.offloaded_scopes(model) == []
    peft_fast.offload_checkpoints(model, modules=[model], min_bytes=0)
    (g0, a0), (g1, a1) = run(control), run(model)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert all(a0) and not any(a1[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device memory: needs CUDA")
def test_frees_device_memory_on_cuda():
    layers, ids = 6, _ids(shape=(4, 512), device="cuda")
    width = dict(hidden_size=1024, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=4)
    peaks, steps = [], []
    for on in (False, True):
        model = _model(layers=layers, device="cuda", dtype=torch.bfloat16, **width)
        if on:
            peft_fast.offload_checkpoints(model)
        _step(model, ids)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        steps.append(_step(model, ids))
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    _same(*steps, tol=2e-2)  # the GPU's kernels need not be bitwise deterministic run to run
    hidden = ids.numel() * width["hidden_size"] * 2  # 4 MiB: above the default min_bytes
    # Without the offload all six inputs wait on the device; with it at most the one in use and the one prefetched.
    assert peaks[1] <= peaks[0] - (layers - 3) * hidden, (peaks, hidden)
    assert not any(steps[1][2][1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streams: needs CUDA")
def test_slow_copies_are_waited_for(monkeypatch):
    """Copies held up on the side stream (a GPU sleep before each) must still be waited for: a missing wait reads
    pinned memory before the copy filled it, or device memory before the copy back did."""
    real = offload._side_stream

    def slow(device):
        stream = real(device)
        with torch.cuda.stream(stream):
            torch.cuda._sleep(2_000_000)
        return stream

    ids = _ids(shape=(2, 256), device="cuda")
    control = _step(_model(layers=4, device="cuda"), ids)
    monkeypatch.setattr(offload, "_side_stream", slow)
    got = _step(peft_fast.offload_checkpoints(_model(layers=4, device="cuda"), min_bytes=0), ids)
    _same(control, got, tol=1e-4)  # float32: tf32 or atomics may differ run to run, stale bytes would not be close


def test_a_no_grad_forward_in_train_mode_is_left_alone(on_cpu):
    """Under no_grad nothing is saved, so nothing is offloaded or checked: no "checkpointing is off" warning (as in
    generate() or an evaluation loop of a model left in train mode)."""
    model = peft_fast.offload_checkpoints(_model(checkpointing=False), min_bytes=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(input_ids=_ids())


def test_host_copies_live_from_their_offload_to_the_backward_that_takes_them(on_cpu, monkeypatch):
    """Host memory peaks at the forward's end and shrinks through the backward: when the first layer's input comes
    back, every later layer's host copy (used already) is gone, none outlives the step even while the caller keeps
    the loss, and none piles up across steps."""
    import weakref

    boxes, alive_at_first = [], []
    init, take = offload._Offloaded.__init__, offload._Offloaded.take

    def track(self, *args):
        init(self, *args)
        boxes.append(weakref.ref(self))

    def taking(self):
        if self.index == 0:
            alive_at_first.append(sorted(b().index for b in boxes if b() is not None))
        return take(self)

    monkeypatch.setattr(offload._Offloaded, "__init__", track)
    monkeypatch.setattr(offload._Offloaded, "take", taking)
    model = peft_fast.offload_checkpoints(_model(), min_bytes=0)
    for step in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = model(input_ids=_ids(), labels=_ids())
        assert any(b() is not None for b in boxes)
        loss.loss.backward()
        assert all(b() is None for b in boxes), sum(b() is not None for b in boxes)
        assert alive_at_first[step] == [0], alive_at_first
    assert len(boxes) >= 6

"""torch.compile of a whole training step (forward, loss; backward through the compiled graph) on a tiny Llama, for
every fast path: LoRA with dropout, DoRA, an NF4Linear base (peft_fast.quantize) and a bitsandbytes 4-bit base,
each with and without gradient checkpointing, on the reference path and on the Triton path (the CPU interpreter).

Each step must be one graph (fullgraph=True, and a counting backend sees one frame), and give the eager model's
loss and gradients. The step is compiled after one eager optimizer step, because eager calls fill caches that a
compiled step must not trip over (a DoRA step once broke 42 times there). On a GPU, the step also replays as CUDA
graphs under mode="reduce-overhead"."""
import copy
import warnings

import pytest
import torch
from switches import hub_kernels_checkpointing, use_settings
from tiny_models import peft_fast_only
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import peft_fast

pytestmark = peft_fast_only
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 2e-3 if DEVICE == "cuda" else 1e-5  # float32 dots may use tf32 on a GPU

VARIANTS = {
    "lora-dropout": dict(lora_dropout=0.1),
    "dora": dict(use_dora=True),
    "nf4": dict(),
    "dora-nf4": dict(use_dora=True),
    "dora-nf4-bf16store": dict(use_dora=True),  # the codes stored as bf16 (quant_storage), read as their bytes
    "bnb4": dict(),
}


def _model(variant, checkpointing, tmp_path):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(DEVICE)
    if "nf4" in variant:
        peft_fast.quantize(base, quant_storage=torch.bfloat16 if variant.endswith("bf16store") else torch.uint8)
    if variant == "bnb4":
        pytest.importorskip("bitsandbytes")
        base.save_pretrained(tmp_path)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               bnb_4bit_use_double_quant=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q, device_map=DEVICE,
                                                        dtype=torch.float32)
    lora = peft_fast.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                init_lora_weights=False, **VARIANTS[variant])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft_fast.get_peft_model(base, lora)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers hooks the input embeddings to call requires_grad_ on their output, which dynamo cannot trace:
        # a graph break, with PEFT alike. Non-reentrant checkpointing does not need the hook. (Enabled before
        # get_peft_model, the hook is registered twice, as with PEFT, and disable_input_require_grads removes one.)
        base.disable_input_require_grads()
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compiled_step_is_one_graph_with_eager_loss_and_gradients(variant, checkpointing, backend, monkeypatch,
                                                                  tmp_path):
    use_settings(monkeypatch, backend=backend)
    model = _model(variant, checkpointing, tmp_path)
    model.train()
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def step(m):
        return m(input_ids=ids, labels=ids, use_cache=False).loss  # the cache would warn mid-graph (checkpointing)

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    step(model).backward()  # one eager step first: whatever it caches must not break the compiled one
    opt.step()
    opt.zero_grad(set_to_none=True)
    eager = copy.deepcopy(model)

    torch.manual_seed(3)
    want_loss = step(eager)
    want_loss.backward()
    want = _grads(eager)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    torch.manual_seed(3)
    with hub_kernels_checkpointing(model):
        loss = torch.compile(step, fullgraph=True, backend=counter)(model)
    loss.backward()
    assert counter.frame_count == 1
    got = _grads(model)
    assert got.keys() == want.keys() and any("lora_" in n for n in want)
    torch.testing.assert_close(loss.detach(), want_loss.detach(), atol=TOL, rtol=TOL)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=TOL, rtol=10 * TOL, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_nf4_decode_with_the_gemv_is_one_graph(backend, monkeypatch, tmp_path):
    """Inference over NF4 bases with PEFT_FAST_NF4_DECODE=gemv: the GEMV runs as a custom op inside the graph."""
    use_settings(monkeypatch, backend=backend, nf4_decode="gemv")
    model = _model("nf4", False, tmp_path).eval()
    ids = torch.randint(1, 97, (1, 5), generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def logits(m):
        return m(input_ids=ids, use_cache=False).logits

    with torch.no_grad():
        want = logits(model)
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        got = torch.compile(logits, fullgraph=True, backend=counter)(model)
    assert counter.frame_count == 1
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU (gpu_check stage peft_fast)")
@pytest.mark.parametrize("variant", ["lora-dropout", "dora-nf4"])
def test_training_step_replays_as_a_cuda_graph(variant, monkeypatch, tmp_path):
    """mode="reduce-overhead": inductor captures the whole step (forward, loss, backward), Triton launches and custom
    ops included, as CUDA graphs, and replays it with eager's loss and gradients. fallback_random makes the compiled
    step draw the dropout seeds from eager's generator, so dropout's masks must match too. A replay runs no Python:
    the LoRA launches seen in the warm-up must be gone from the third step."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    from peft_fast.kernels.common import lora_mm

    use_settings(monkeypatch, backend="triton")
    model = _model(variant, False, tmp_path).train()
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(1)).to("cuda")
    launches = []
    real = lora_mm.launch
    monkeypatch.setattr(lora_mm, "launch", lambda *args, **kw: launches.append(1) or real(*args, **kw))

    def step(m):
        return m(input_ids=ids, labels=ids, use_cache=False).loss

    def eager_grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss = step(model)
        loss.backward()
        return loss.detach().clone(), _grads(model)

    want_loss, want = eager_grads()
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(inductor_config, "fallback_random", True)
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    per_step = []
    for _ in range(3):  # warm-up, record, replay
        launches.clear()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss = compiled(model)
        loss.backward()
        loss = loss.detach().clone()  # the graph's output buffer is reused by the next replay
        per_step.append(len(launches))
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert per_step[0] > 0 and per_step[2] == 0, per_step
    got = _grads(model)
    assert got.keys() == want.keys()
    torch.testing.assert_close(loss, want_loss, atol=2e-3, rtol=2e-3)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-3, rtol=2e-2, msg=name)

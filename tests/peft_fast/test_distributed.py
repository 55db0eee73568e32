"""DDP and FSDP2 on the CPU with gloo, two processes: training equals one process on the whole batch (LoRA, DoRA,
NF4Linear and bitsandbytes 4-bit bases with codes stored as uint8 or a float type, fp32 adapters over a bf16 base,
a Mixtral's expert stacks through target_parameters, dense or 4-bit, the fused decoder), DDP broadcasts no base
weights and FSDP2 shards them all, saving from a sharded model writes the single process's files, loading into a
sharded model works, merging refuses with a way out, eval caches do not outlive a step across reshards, a bf16
param_dtype meets NF4 codes stored as bf16 or is named, and Accelerate's own FSDP2 preparation shards 4-bit models.
The ranks run tests/helpers/dist_worker.py (all scenarios in one launch, about 15 s here); the example
examples/train_distributed.py runs under torchrun as users run it."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import AGAINST_PEFT

pytestmark = pytest.mark.skipif(AGAINST_PEFT or not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="peft_fast under torch.distributed (gloo)")
WORLD = 2
HELPERS = Path(__file__).resolve().parents[1] / "helpers"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_distributed.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PEFT_FAST_BACKEND"}
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    port = _free_port()
    ranks = [subprocess.Popen([sys.executable, str(HELPERS / "dist_worker.py"), str(out)], cwd=out,
                              env=_env(r, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    logs = []
    try:
        for p in ranks:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in ranks:
            p.kill()
    assert all(p.returncode == 0 for p in ranks), "\n".join(log[-3000:] for log in logs)
    return json.loads((out / "results.json").read_text())


SCENARIOS = ["ddp-lora", "ddp-dora", "ddp-nf4", "ddp-bnb", "fsdp-lora-bf16", "fsdp-dora", "fsdp-nf4", "fsdp-bnb",
             "fsdp-bnb-f32store", "fsdp-bnb-bfloat16store", "fsdp-nf4-f32store", "fsdp-nf4-bfloat16store", "ddp-moe",
             "fsdp-moe", "ddp-moe-nf4", "fsdp-moe-nf4", "fsdp-moe-nf4-bfloat16store", "ddp-fused", "fsdp-fused",
             "accelerate-nf4-bfloat16store", "accelerate-moe-nf4-bfloat16store"]


def _tol(name):  # a bf16 base rounds the activations the adapters see
    return 2e-2 if "bf16" in name else 1e-5


# torch 2.11's fully_shard makes every sharded parameter require grad before it copies the original's flag, which
# integer tensors refuse: 4-bit bases (uint8 codes) cannot be sharded before torch 2.12.
SHARDS_INTEGERS = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 12)
TORCH_REFUSAL = "only Tensors of floating point dtype can require gradients"


def _result(results, name):
    if "bnb" in name:
        pytest.importorskip("bitsandbytes")
    r = results[name]
    if name in ("fsdp-nf4", "fsdp-bnb", "fsdp-moe-nf4") and not SHARDS_INTEGERS:
        assert TORCH_REFUSAL in r.get("error", ""), r  # so this skip ends with the limitation
        pytest.skip(f"torch {torch.__version__}: FSDP2 cannot shard the 4-bit codes (uint8) before torch 2.12")
    assert "error" not in r, r["error"]
    return r


@pytest.mark.parametrize("name", SCENARIOS)
def test_training_equals_one_process_on_the_whole_batch(results, name):
    r = _result(results, name)
    assert r.get("logits_skipped", "fused" not in name)  # the fused decoder's loss ran under DDP / FSDP2
    assert r["loss_fell"]
    assert r["loss_diff"] < 1e-5, r
    assert r["weight_diff"] < _tol(name), r


@pytest.mark.parametrize("name", [s for s in SCENARIOS if s.startswith("ddp")])
def test_ddp_reduces_only_the_adapter_and_broadcasts_no_base_weights(results, name):
    r = _result(results, name)
    assert r["bucket_bytes"] == r["adapter_bytes"], r  # the gradient buckets hold the adapter and nothing else
    assert r["buffer_bytes"] <= 256, r  # per-step buffer broadcasts: rotary frequencies only, no NF4 codes
    assert r["nf4_params_frozen"]


@pytest.mark.parametrize("name", [s for s in SCENARIOS if s.startswith(("fsdp", "accelerate"))])
def test_fsdp2_shards_saves_loads_and_refuses_merging(results, name):
    r = _result(results, name)
    # parameters and buffers, NF4 codes (expert stacks too) included, split across ranks
    assert r["rank_bytes"] <= r["full_bytes"] / WORLD + 1024, r
    assert r["saved_keys_equal"]
    assert r["saved_vs_single"] < _tol(name), r  # gathered on every rank, written by rank 0
    assert r["state_dict_vs_sharded"] == 0.0  # save_pretrained(state_dict=get_model_state_dict(...)), Accelerate's way
    assert r["loaded_vs_single"] < _tol(name), r  # load_adapter into the sharded model's adapter
    assert "FSDP2" in r["merge_refused"] and "save_pretrained" in r["merge_refused"]
    assert "add_adapter" in r["add_refused"] and "before fully_shard" in r["add_refused"]
    assert "load_adapter of a new adapter" in r["load_new_refused"]
    # (bitsandbytes computes eval forwards without gradients in bf16 on CPUs: it rounds more)
    eval_tol = _tol(name) if "bf16" in name else 1e-3 if "bnb" in name else 1e-4
    assert r["eval_after_step_diff"] < eval_tol, r


def test_fsdp2_mixed_precision_over_codes_stored_as_its_param_dtype(results):
    """A bf16 param_dtype casts every gathered parameter: NF4 codes stored as bf16 cross it unchanged and train;
    stored as float32 they would be converted, and the next forward says so instead of computing with them."""
    assert results["fsdp-bf16-params-nf4-bfloat16store"] == {"loss_fell": True}
    refused = results["fsdp-bf16-params-nf4-f32store"]["error"]
    assert "stored as float32 but the weight is now bfloat16" in refused and "param_dtype" in refused


def test_accelerate_cpu_ram_efficient_loading_over_4bit_codes_is_named(results):
    """Accelerate's FSDP2 cpu_ram_efficient_loading moves the model to meta and reloads it by state-dict keys, which
    reach no 4-bit quant state (it skips the step for bitsandbytes' layers, which it recognises by class): the
    error says so and how to turn it off, instead of failing inside torch."""
    refused = results["accelerate-cpu-ram-efficient-loading"]["error"]
    assert "meta device" in refused and "cpu_ram_efficient_loading" in refused and "false" in refused, refused


def _run_example(tmp_path, world: int, args: list) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={_free_port()}",
           str(EXAMPLE), *args, "--steps", "6", "--out", str(tmp_path / "adapter")]
    env = {k: v for k, v in os.environ.items() if k != "PEFT_FAST_BACKEND"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "reloaded logits match" in done.stdout, done.stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


# Under FSDP2 the example stores the NF4 codes in the base's float type (quant_storage): every torch version shards it.
@pytest.mark.parametrize("args", [["--mode", "ddp", "--quantize"], ["--mode", "fsdp", "--dora", "--quantize"]],
                         ids=["ddp-nf4", "fsdp-nf4-dora"])
def test_the_example_runs_under_torchrun(tmp_path, args):
    _run_example(tmp_path, WORLD, args)


@pytest.mark.skipif(not torch.cuda.is_available() or not torch.distributed.is_nccl_available(),
                    reason="needs a CUDA GPU and NCCL (bench/gpu_check.sh runs it: stage distributed)")
@pytest.mark.parametrize("args", [["--mode", "fsdp"], ["--mode", "fsdp", "--dora", "--quantize"]],
                         ids=["fsdp", "fsdp-nf4-dora"])
def test_the_example_on_one_gpu(tmp_path, args):
    """World size 1 is enough to meet the CUDA-only faults: NCCL, bf16 bases, the Triton kernels under FSDP2 (DoRA
    over NF4 codes stored as bf16)."""
    _run_example(tmp_path, 1, args)

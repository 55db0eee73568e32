"""One rank of the distributed tests (tests/peft_fast/test_distributed.py starts WORLD of them with gloo on the CPU).

Every scenario trains a tiny Llama's adapter for two SGD steps under DDP or FSDP2, each rank on its part of one
batch, and, in the same process, a copy of the model without any wrapper on the whole batch (the single-process
run the parallel one must equal). It then records, on rank 0, the largest differences of losses and adapter
weights, and what the scenario checks besides (gradient buckets, bytes per rank, files, loading, refusals). The
results go to OUT/results.json; the test makes the assertions.

    python dist_worker.py OUT        (with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)
"""
import copy
import importlib.util
import json
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist

warnings.simplefilter("ignore")
torch.set_num_threads(1)

import peft_fast  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM  # noqa: E402

ROWS, SEQ, STEPS, LR = 4, 8, 2, 0.5
SCENARIOS = [("ddp", "lora"), ("ddp", "dora"), ("ddp", "nf4"), ("ddp", "bnb"), ("fsdp", "lora-bf16"),
             ("fsdp", "dora"), ("fsdp", "nf4"), ("fsdp", "bnb"), ("fsdp", "bnb-f32store"),
             ("fsdp", "bnb-bfloat16store"), ("fsdp", "nf4-f32store"), ("fsdp", "nf4-bfloat16store"), ("ddp", "moe"),
             ("fsdp", "moe"), ("ddp", "moe-nf4"), ("fsdp", "moe-nf4"), ("fsdp", "moe-nf4-bfloat16store"),
             ("ddp", "fused"), ("fsdp", "fused"), ("accelerate", "nf4-bfloat16store"),
             ("accelerate", "moe-nf4-bfloat16store")]
# accelerate: sharded by Accelerate's own FSDP2 preparation (what Trainer's and TRL's fsdp settings run)
# *store: 4-bit codes stored as a float type (bnb_4bit_quant_storage / quantize's quant_storage), as FSDP setups do so
# that they shard like the other weights (and so that torch 2.11's fully_shard, which refuses integer parameters,
# takes them)
STORAGES = {"f32store": torch.float32, "bfloat16store": torch.bfloat16}
BNB_DIR = None  # a tiny Llama saved once, loaded in 4-bit by transformers + bitsandbytes for the "bnb" scenarios


def base(kind: str):
    if kind.startswith("bnb"):
        from qlora_models import load4

        storage = STORAGES.get(kind.removeprefix("bnb-"), torch.uint8)
        return load4(BNB_DIR, (torch.float32, torch.float32, True, "nf4"), quant_storage=storage)
    torch.manual_seed(0)
    if kind.startswith("moe"):  # experts as 3-D stacks, adapted through target_parameters; moe-nf4*: stacks in 4 bits
        model = MixtralForCausalLM(MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                                 max_position_embeddings=32, num_local_experts=4,
                                                 num_experts_per_tok=2))
        if kind.startswith("moe-nf4"):
            return peft_fast.quantize(model, quant_storage=STORAGES.get(kind.removeprefix("moe-nf4-"), torch.uint8))
        return model
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                         max_position_embeddings=32))
    if kind == "lora-bf16":
        model = model.to(torch.bfloat16)  # fp32 adapters over a bf16 base: one FSDP unit of mixed dtypes
    if kind.startswith("nf4"):
        return peft_fast.quantize(model, quant_storage=STORAGES.get(kind.removeprefix("nf4-"), torch.uint8))
    return model


def adapted(kind: str):
    torch.manual_seed(1)
    config = peft_fast.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                  use_dora=kind == "dora")
    if kind.startswith("moe"):
        config = peft_fast.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                      target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    # "fused": the fused decoder (norms, rotary embedding, MLP activation, the loss without logits) under the wrappers
    return peft_fast.get_peft_model(base(kind), config, fused="compile" if kind == "fused" else None)


def accelerate_fsdp2(model, cpu_ram_efficient_loading=False):
    """Accelerate's FSDP2 preparation, driven directly: its Accelerator takes FSDP on accelerators only, and the
    preparation reads nothing else from it than the stand-in gives."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    layer = type(model.get_base_model().model.layers[0]).__name__
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=[layer],
                                            cpu_ram_efficient_loading=cpu_ram_efficient_loading)
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), device=torch.device("cpu"),
                                  is_main_process=dist.get_rank() == 0, process_index=dist.get_rank(),
                                  parallelism_config=None, mixed_precision="no", torch_device_mesh=None)
    return fsdp2_prepare_model(accelerator, model)


def wrap(model, mode: str):
    if mode == "accelerate":
        return accelerate_fsdp2(model)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if type(t).__name__ == "DTensor" else t


def adapter_weights(model) -> dict:
    return {n: whole(p.detach()).float() for n, p in model.named_parameters() if p.requires_grad}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a, (sorted(a)[:3], sorted(b)[:3])
    return max((a[k] - b[k]).abs().max().item() for k in a)


def train(model, ids, steps=STEPS):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
    return losses


def scenario(mode: str, kind: str, rank: int, world: int, out: str) -> dict:
    ids = torch.randint(0, 64, (ROWS, SEQ), generator=torch.Generator().manual_seed(2))
    mine = ids[rank * ROWS // world:(rank + 1) * ROWS // world]
    model = adapted(kind)
    single = copy.deepcopy(model)  # the run to equal: one process, the whole batch, no wrapper
    full_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    wrapped = wrap(model, mode)
    losses = train(wrapped, mine)
    for loss in losses:
        dist.all_reduce(loss)
    losses = [(loss / world).item() for loss in losses]
    single_losses = [loss.item() for loss in train(single, ids)]
    res = {"loss_diff": max(abs(a - b) for a, b in zip(losses, single_losses)),
           "loss_fell": single_losses[-1] < single_losses[0],
           "weight_diff": max_diff(adapter_weights(model), adapter_weights(single)),
           "adapter_bytes": sum(p.numel() * p.element_size() for p in single.parameters() if p.requires_grad)}
    if mode == "ddp":
        logged = wrapped._get_ddp_logging_data()
        res["bucket_bytes"] = sum(int(b) for b in str(logged["bucket_sizes"]).split(",") if b.strip())
        res["buffer_bytes"] = sum(b.numel() * b.element_size() for b in model.buffers())
        res["nf4_params_frozen"] = all(not m.weight.requires_grad for m in model.modules()
                                       if isinstance(m, peft_fast.NF4Linear)) and all(
            not p.requires_grad for p in model.parameters() if p.dtype == torch.uint8)
    else:
        local = sum(t.to_local().numel() * t.element_size() if type(t).__name__ == "DTensor"
                    else t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        res.update(rank_bytes=local, full_bytes=full_bytes)
        res.update(files(model, single, rank, kind, f"{out}/{mode}-{kind}"))
        res.update(eval_after_step(model, single, ids))
    if kind == "fused":  # the fused loss ran under the wrapper: a training forward with labels builds no logits
        wrapped.train()  # (last: a forward without backward leaves FSDP2's root unsharded)
        res["logits_skipped"] = wrapped(input_ids=mine, labels=mine).logits is None
    if mode == "ddp":  # a DDP wrapper alive after its group is torn down hangs the process at exit
        del wrapped
    return res


def files(model, single, rank: int, kind: str, folder: str) -> dict:
    """Saving from the sharded model (gathered on every rank, written by rank 0), by state_dict= as Accelerate
    does, and loading a file into the sharded model's existing adapter."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model.save_pretrained(f"{folder}/sharded", is_main_process=rank == 0)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    model.save_pretrained(f"{folder}/state_dict", state_dict=full, is_main_process=rank == 0)
    res = {}
    if rank == 0:
        single.save_pretrained(f"{folder}/single")
        a, b, c = (load_file(f"{folder}/{d}/adapter_model.safetensors") for d in ("sharded", "state_dict", "single"))
        res["saved_keys_equal"] = a.keys() == b.keys() == c.keys()
        res["saved_vs_single"] = max((a[k].float() - c[k].float()).abs().max().item() for k in a)
        res["state_dict_vs_sharded"] = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    dist.barrier()
    refusals = {"merge_refused": lambda: model.merge_and_unload(),
                "add_refused": lambda: model.add_adapter("other", peft_fast.LoraConfig(target_modules=["q_proj"])),
                "load_new_refused": lambda: model.load_adapter(f"{folder}/sharded", adapter_name="other")}
    for key, call in refusals.items():
        try:
            call()
            res[key] = ""
        except RuntimeError as exc:
            res[key] = str(exc)
    fresh = wrap(adapted(kind), "fsdp")
    fresh.load_adapter(f"{folder}/single", adapter_name="default", is_trainable=True)
    probe = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        res["loaded_vs_single"] = (fresh.eval()(input_ids=probe).logits.float()
                                   - single.eval()(input_ids=probe).logits.float()).abs().max().item()
    single.train()
    return res


def eval_after_step(model, single, ids) -> dict:
    """Values cached in eval (DoRA's scale, the base norms) must not outlive an optimizer step on the shards,
    across the reshard that follows every forward."""
    model.eval(), single.eval()
    with torch.no_grad():
        model(input_ids=ids), single(input_ids=ids)
    train(model, ids, steps=1)  # every rank the whole batch: the averaged gradient is the whole batch's
    train(single, ids, steps=1)
    with torch.no_grad():
        diff = (model(input_ids=ids).logits.float() - single(input_ids=ids).logits.float()).abs().max().item()
    model.train(), single.train()
    return {"eval_after_step_diff": diff}


def mixed_precision(storage: torch.dtype) -> dict:
    """FSDP2 with a bf16 param_dtype over NF4 codes stored as `storage`: the all-gather casts them, so only a bf16
    storage computes (its bytes cross unchanged); another one must be named, not computed with."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = peft_fast.get_peft_model(peft_fast.quantize(base("lora"), quant_storage=storage), peft_fast.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    ids = torch.randint(0, 64, (ROWS, SEQ), generator=torch.Generator().manual_seed(2))
    try:
        losses = [loss.item() for loss in train(model, ids, steps=3)]
    except RuntimeError as exc:
        return {"error": str(exc)}
    return {"loss_fell": losses[-1] < losses[0]}


def main() -> int:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    global BNB_DIR
    BNB_DIR = os.path.join(out, "bnb_base")
    if rank == 0:
        base("lora").save_pretrained(BNB_DIR)
    dist.barrier()
    results = {}
    for mode, kind in SCENARIOS:
        start = time.perf_counter()
        if kind.startswith("bnb") and importlib.util.find_spec("bitsandbytes") is None:
            results[f"{mode}-{kind}"] = {"error": "bitsandbytes is not installed"}
            continue
        try:
            res = scenario(mode, kind, rank, world, out)
        except Exception as exc:  # recorded for the test to show; the other scenarios still run
            res = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        results[f"{mode}-{kind}"] = {**res, "seconds": time.perf_counter() - start}
    for name, storage in (("bfloat16store", torch.bfloat16), ("f32store", torch.float32)):
        results[f"fsdp-bf16-params-nf4-{name}"] = mixed_precision(storage)
    try:  # reloads by state-dict keys from the meta device, which 4-bit quant states cannot take: named
        accelerate_fsdp2(adapted("nf4-bfloat16store"), cpu_ram_efficient_loading=True)
        results["accelerate-cpu-ram-efficient-loading"] = {}
    except Exception as exc:
        results["accelerate-cpu-ram-efficient-loading"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    if rank == 0:
        with open(os.path.join(out, "results.json"), "w") as fh:
            json.dump(results, fh, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

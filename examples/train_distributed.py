"""LoRA (or DoRA, or QLoRA on NF4 layers) across processes: DDP or FSDP2, launched by torchrun or Accelerate.

    torchrun --nproc_per_node=2 examples/train_distributed.py --mode fsdp
    torchrun --nproc_per_node=2 examples/train_distributed.py --mode ddp --quantize
    accelerate launch --multi_gpu --num_processes 2 examples/train_distributed.py --mode fsdp --dora

One process per GPU with NCCL; on a machine without GPUs, processes on the CPU with gloo. The base is the demo's
tiny Llama (bf16 on GPUs, float32 on CPUs; `--quantize`: NF4Linear layers made by peft_fast.quantize), the data
the demo's text. Each rank trains on its own batches, then every rank saves (FSDP2 gathers the adapter; rank 0
writes PEFT's files) and rank 0 reloads the adapter onto a fresh, unsharded base in one process and checks that
its logits equal the trained model's. It exits non-zero if the loss did not fall or the logits differ.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # demo.py, also when the script's folder is not
from demo import DATA, SEQ_LEN, build_base, encode  # noqa: E402  (on sys.path: python -P, PYTHONSAFEPATH)

import peft_fast  # noqa: E402
from peft_fast import LoraConfig, PeftModel, get_peft_model  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("ddp", "fsdp"), default="fsdp", help="DistributedDataParallel or FSDP2")
    p.add_argument("--dora", action="store_true", help="DoRA adapters (use_dora=True)")
    p.add_argument("--quantize", action="store_true", help="NF4 base layers (peft_fast.quantize): QLoRA")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank and step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "distributed"))
    return p.parse_args()


def setup() -> tuple[int, int, torch.device]:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
        return rank, dist.get_world_size(), torch.device("cuda", local)
    torch.set_num_threads(1)  # the CPU's cores are shared by the ranks
    return rank, dist.get_world_size(), torch.device("cpu")


def make_base(args, device: torch.device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = build_base().to(device, dtype)
    if not args.quantize:
        return base
    # Under FSDP2 the 4-bit codes are stored in the base's float type (bitsandbytes' quant_storage), so that they
    # shard like the other weights: torch 2.11's fully_shard refuses integer parameters.
    return peft_fast.quantize(base, quant_storage=dtype if args.mode == "fsdp" else torch.uint8)


def make_model(args, device: torch.device):
    base = make_base(args, device)
    torch.manual_seed(1)  # the same adapter init on every rank
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=args.dora))


def wrap(model, mode: str, device: torch.device):
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_base_model().model.layers:  # one FSDP unit per decoder layer, then the rest
        fully_shard(layer)
    fully_shard(model)
    return model


def batches(data: torch.Tensor, rank: int, args, device: torch.device):
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own samples
    for _ in range(args.steps):
        starts = torch.randint(0, len(data) - SEQ_LEN, (args.batch,), generator=gen).tolist()
        yield torch.stack([data[s:s + SEQ_LEN] for s in starts]).to(device)


def main() -> int:
    args = parse()
    rank, world, device = setup()
    model = make_model(args, device)
    trained = wrap(model, args.mode, device)
    data = encode((DATA / "keeper_log.txt").read_text(encoding="utf-8"))
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=args.lr)
    losses, start = [], time.perf_counter()
    model.train()
    for step, ids in enumerate(batches(data, rank, args, device)):
        loss = trained(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {losses[-1]:.3f}", flush=True)
    if rank == 0:
        print(f"{args.mode}, {world} ranks on {device.type}: {args.steps} steps in {time.perf_counter() - start:.1f}s")

    model.save_pretrained(args.out, is_main_process=rank == 0)  # every rank: FSDP2 gathers the adapter
    probe = data[:SEQ_LEN].unsqueeze(0).to(device)
    model.eval()
    with torch.no_grad():
        logits = trained(input_ids=probe).logits.float()  # every rank: a sharded forward is collective
    ok = losses[-1] < losses[0]
    if rank == 0:
        reloaded = PeftModel.from_pretrained(make_base(args, device), args.out)  # one process, no sharding
        with torch.no_grad():
            again = reloaded(input_ids=probe).logits.float()
        tol = 1e-2 if device.type == "cuda" else 1e-4
        same = torch.allclose(again, logits, atol=tol, rtol=tol)
        print(f"saved {args.out}; loss {losses[0]:.3f} -> {losses[-1]:.3f}; reloaded logits "
              f"{'match' if same else 'DIFFER'} (max diff {(again - logits).abs().max().item():.2e})")
        ok = ok and same
    verdict = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
    # A DDP wrapper still alive when its process group is destroyed makes the process hang at exit (gloo).
    del trained, opt
    gc.collect()
    dist.destroy_process_group()
    return 0 if verdict.item() == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())

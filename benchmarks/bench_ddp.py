"""Data parallel on one host: N ranks (torchrun) train LoRA on the DeepSeek-V2-Lite-shaped random checkpoint with
one shared expert store (kt_sft/distributed.py); tokens/s of all ranks together and each rank's memory.

Run under torchrun, once per rank count, on the same checkpoint (written by bench_e2e.py / bench_load.py's writer
when --dir lacks it; the ranks wait for rank 0 to write it):

    torchrun --nproc_per_node 1 benchmarks/bench_ddp.py --dir /tmp/v2lite-rand      # device: benchmarks/device_ddp.sh
    torchrun --nproc_per_node 2 benchmarks/bench_ddp.py --dir /tmp/v2lite-rand
    torchrun --nproc_per_node 2 benchmarks/bench_ddp.py --tiny                     # CPU smoke run of the script

The ranks share the GPU there is (all on cuda:0 with --same-gpu, the one-GPU check; else cuda:LOCAL_RANK) and the
CPU cores (each rank's engine gets cores / ranks threads); the process group is gloo (NCCL refuses two ranks on
one GPU). Each rank trains on its own random batches (batch x seq tokens) through DistributedDataParallel, as the
Trainer does. Rank 0 prints one line per rank (RSS private, RSS of the store, the store's Pss, peak GPU) and
  tokens/s   ranks x batch x seq / median step wall (the slowest rank's: the steps synchronize)
--json prints it as one JSON row on stdout.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import DEFAULT_TARGETS, EXPERT_TARGETS, ensure_checkpoint, tiny_config  # noqa: E402
from bench_load import v2_lite_config  # noqa: E402

GB = 1e9


def memory() -> dict:
    """This process's private RSS, RSS of shared files and the Pss of kt-sft's store (kt-sft-experts-* mappings)."""
    status = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("Rss")}
    store_pss, in_store = 0, False
    for line in open("/proc/self/smaps"):
        first = line.split()[0]
        if not first.endswith(":"):
            in_store = "kt-sft-experts-" in line
        elif in_store and first == "Pss:":
            store_pss += int(line.split()[1]) * 1024
    return {"rss_anon_gb": status.get("RssAnon", 0) / GB, "rss_shmem_gb": status.get("RssShmem", 0) / GB,
            "store_pss_gb": store_pss / GB}


def load(args, device: torch.device):
    import kt_sft
    from peft import LoraConfig

    from kt_sft.models.expert_lora import get_peft_model

    start = time.perf_counter()
    model = kt_sft.load_model(args.dir, device=device, dtype=torch.bfloat16, progress=False,
                              gpu_experts=args.gpu_experts, format=args.format)
    load_s = time.perf_counter() - start
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=DEFAULT_TARGETS,
                        target_parameters=EXPERT_TARGETS if args.expert_lora else None)
    torch.manual_seed(0)
    return get_peft_model(model, config), load_s


def train(model, args, device: torch.device) -> list[float]:
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(1234 + dist.get_rank())  # each rank its own data
    walls = []
    for i in range(args.warmup + args.steps):
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
        dist.barrier()
        start = time.perf_counter()
        loss = ddp(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)  # the step of all ranks ends with the slowest
        if dist.get_rank() == 0:
            print(f"  step {i + 1}: {wall.item() * 1e3:.0f} ms, loss {loss.item():.4f}", file=sys.stderr, flush=True)
        if i >= args.warmup:
            walls.append(wall.item())
    return walls


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=1))
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if rank == 0:
        config = tiny_config(4) if args.tiny else v2_lite_config(args.layers)
        ensure_checkpoint(args.dir, config, int(0.05 * GB if args.tiny else 2 * GB))
    dist.barrier()
    device = torch.device("cuda", 0 if args.same_gpu else local) if torch.cuda.is_available() else torch.device("cpu")
    model, load_s = load(args, device)
    walls = train(model, args, device)
    row = {"ranks": world, "tokens_per_s": world * args.batch * args.seq / statistics.median(walls),
           "step_ms": statistics.median(walls) * 1e3, "load_s": load_s, "summary": model.kt_summary, **memory(),
           "peak_gpu_gb": torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else 0.0}
    rows: list = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        print(row["summary"], file=sys.stderr)
        for r, res in enumerate(rows):
            print(f"rank {r}: RSS private {res['rss_anon_gb']:.2f} GB, shared {res['rss_shmem_gb']:.2f} GB, store Pss "
                  f"{res['store_pss_gb']:.2f} GB, peak GPU {res['peak_gpu_gb']:.2f} GB, load {res['load_s']:.0f} s",
                  file=sys.stderr)
        print(f"{world} rank(s): {row['tokens_per_s']:.0f} tokens/s ({args.batch}x{args.seq} per rank, step "
              f"{row['step_ms']:.0f} ms); host RSS private {sum(r['rss_anon_gb'] for r in rows):.2f} GB + store "
              f"{sum(r['store_pss_gb'] for r in rows):.2f} GB", file=sys.stderr)
        if args.json:
            print(json.dumps({"bench": "bench_ddp", **row, "per_rank": rows}))
    dist.destroy_process_group()


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=None, help="checkpoint (default /tmp/v2lite-rand; --tiny: "
                                                          "/tmp/v2lite-tiny-rand)")
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--format", default=None, help="the experts' format (kt_sft.engine.formats; default bf16)")
    p.add_argument("--gpu-experts", default="auto", help="kt_gpu_experts: auto or a fraction (0: all on the CPU)")
    p.add_argument("--expert-lora", action="store_true", help="also LoRA on the routed experts")
    p.add_argument("--same-gpu", action="store_true", help="every rank on cuda:0 (one GPU shared by the ranks)")
    p.add_argument("--tiny", action="store_true", help="toy sizes (CPU smoke run)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.dir is None:
        args.dir = Path("/tmp/v2lite-tiny-rand" if args.tiny else "/tmp/v2lite-rand")
    if args.tiny:
        args.batch, args.seq, args.steps, args.warmup = 1, 64, 2, 1
    args.gpu_experts = args.gpu_experts if args.gpu_experts == "auto" else float(args.gpu_experts)
    return args


if __name__ == "__main__":
    main()

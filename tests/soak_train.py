"""Engine soak: many LoRA training steps of the embedded demo model (examples/demo/model) through the engine, with
the process's RSS (and, on a GPU, the allocated CUDA memory) sampled every step; after a warm-up both must stay flat.

    python tests/soak_train.py --steps 500          (`make soak`; prints the memory series and the growth)

What one step runs is what a LLaMA-Factory step runs on our side: LoRA on the attention linears and on the routed
experts (expert_lora: fp32 factors in RAM, engine-computed gradients), gradient checkpointing (the engine's retained
forwards), the chunked loss, AdamW; batches of random token ids with a varying length, so the engine's scratch,
slots and pinned buffers see changing sizes. A leak of a buffer per call shows as steady growth.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DEMO_MODEL = Path(__file__).resolve().parents[1] / "examples" / "demo" / "model"
PAGE = 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def growth(samples: list, warmup: int) -> int:
    """How much memory grew after warm-up: the median of the last fifth of the samples minus the median of the first
    fifth after `warmup` (medians: a step's own allocations come and go with its batch length)."""
    fifth = max(1, (len(samples) - warmup) // 5)
    first, last = sorted(samples[warmup:warmup + fifth]), sorted(samples[-fifth:])
    return last[len(last) // 2] - first[len(first) // 2]


def soak(steps: int, warmup: int, batch: int = 2, max_len: int = 64, seed: int = 0, log=print) -> dict:
    """Train `steps` steps; returns {"rss": [...], "cuda": [...], "growth_rss", "growth_cuda", "seconds"} (growth:
    `growth`; the samples are taken after each optimizer step)."""
    from peft import LoraConfig

    import kt_sft
    from kt_sft.models import expert_lora

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = kt_sft.load_model(DEMO_MODEL, device=device, dtype=torch.float32, progress=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = expert_lora.get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                         target_parameters=["experts"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    rss, cuda, began = [], [], time.monotonic()
    for step in range(steps):
        length = int(torch.randint(max_len // 2, max_len + 1, (1,), generator=gen))
        ids = torch.randint(3, vocab, (batch, length), generator=gen).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rss.append(rss_bytes())
        cuda.append(torch.cuda.memory_allocated() if device == "cuda" else 0)
        if log and (step + 1) % 50 == 0:
            log(f"soak: step {step + 1}: loss {loss.item():.3f}, RSS {rss[-1] / 2**20:.1f} MiB"
                + (f", CUDA {cuda[-1] / 2**20:.1f} MiB" if device == "cuda" else ""))
    return {"rss": rss, "cuda": cuda, "seconds": time.monotonic() - began,
            "growth_rss": growth(rss, warmup), "growth_cuda": growth(cuda, warmup)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as the test suite does: tiny tensors, and torch threads would compete with the engine's
    result = soak(args.steps, args.warmup)
    print(f"soak: {args.steps} steps in {result['seconds']:.0f} s; after {args.warmup} warm-up steps RSS grew "
          f"{result['growth_rss'] / 2**20:.2f} MiB (from {result['rss'][args.warmup] / 2**20:.1f} MiB; max "
          f"{max(result['rss']) / 2**20:.1f}), CUDA memory {result['growth_cuda'] / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

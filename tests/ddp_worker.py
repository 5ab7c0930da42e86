"""One rank of tests/test_ddp.py's data-parallel runs (started by torchrun, or as plain processes with the
torch.distributed env variables): loads a checkpoint through kt_sft.load_model on a gloo process group, then does
what `mode` says and writes what it saw to OUT/rank<R>.json.

  python ddp_worker.py MODE MODEL_DIR OUT
  train     memory and store facts after the load, then 3 AdamW steps of LoRA (attention + routed experts) on
            this rank's own batch under reentrant gradient checkpointing, gradients clipped to norm 1; the
            trainable parameters' sums after
  fsdp      the same steps with the dense part under FSDP2 (`fully_shard` per decoder layer and the model, the
            expert-LoRA factors left out as kt-sft leaves them out, its joint clip and param-group split)
  mismatch  rank 1 asks for another expert format: the load must fail on every rank
  die       rank 1 exits right after the load; rank 0's next collective must fail with kt-sft's error
  badstore  the store directory (KT_SFT_SHM_DIR) does not exist: the packer fails, every rank must stop
"""
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

import kt_sft
from kt_sft import distributed


def status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def store_mappings() -> dict:
    """Path -> {size, rss, pss} of each kt-sft store mapped into this process (from /proc/self/smaps)."""
    found, current = {}, None
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if not parts[0].endswith(":"):  # a mapping's first line: range perms offset dev inode [path]
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            current = parts[5] if len(parts) > 5 and "kt-sft-experts-" in parts[5] else None
            if current:
                found[current] = {"size": hi - lo, "rss": 0, "pss": 0, "deleted": line.rstrip().endswith("(deleted)")}
        elif current and parts[0] in ("Rss:", "Pss:"):
            found[current][parts[0][:-1].lower()] += int(parts[1]) * 1024
    return found


def _mapping_range(path) -> tuple:
    for line in open("/proc/self/maps"):
        if path and path in line:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            return lo, hi - lo
    return 0, 0


def _peft(model, fsdp: bool):
    from peft import LoraConfig

    from kt_sft.models.expert_lora import get_peft_model

    distributed.set_fsdp(fsdp)  # what the LLaMA-Factory hook sets from the run's FSDP config
    torch.manual_seed(1000 + dist.get_rank())  # the modes start from the same adapter: rank 0's (broadcast)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        target_parameters=["experts"], lora_dropout=0.0)
    return get_peft_model(model, config)


def _shard(model):
    """FSDP2 as accelerate applies it (a unit per decoder layer, then the model), the expert factors ignored."""
    from torch.distributed.fsdp import fully_shard

    from kt_sft.models.expert_lora import expert_lora_parameters

    modules = distributed.fsdp_ignored_modules(model, expert_lora_parameters(model))
    ignored = {p for m in modules for p in m.parameters()}
    distributed.before_sharding(model, expert_lora_parameters(model))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, ignored_params=ignored)
    return fully_shard(model, ignored_params=ignored)


def _full(p) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def train(model, rank: int, fsdp: bool = False) -> dict:
    from torch.distributed.tensor import DTensor

    model = _peft(model, fsdp)
    wrapped = _shard(model) if fsdp else torch.nn.parallel.DistributedDataParallel(model)  # as the Trainer wraps it
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": not fsdp})
    model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    if fsdp:
        distributed.split_param_groups(optimizer)
    clip = distributed.clip_grad_norm if fsdp else torch.nn.utils.clip_grad_norm_
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    vocab = model.config.vocab_size
    losses, norms = [], []
    for _ in range(3):
        ids = torch.randint(3, vocab, (2, 12), generator=g)
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        norms.append(clip(params, 1.0).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sums = {n: _full(p).detach().double().sum().item() for n, p in named}
    return {"losses": losses, "norms": norms, "param_sums": sums,
            "plain": sorted(n for n, p in named if not isinstance(p, DTensor) and p.device.type == "cpu"),
            "param_groups": len(optimizer.param_groups),
            "ignored_by_ddp": len(getattr(model, "_ddp_params_and_buffers_to_ignore", [])),
            "mappings_after": store_mappings()}


def main() -> None:
    mode, model_dir, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    distributed.set_timeout(60)
    rank = dist.get_rank()
    result = {"rank": rank}
    try:
        fmt = "bf16" if mode == "mismatch" and rank == 1 else "fp32"
        before = status("RssAnon")
        model = kt_sft.load_model(model_dir, device="cpu", dtype=torch.float32, format=fmt, progress=False)
        layers = [m.kt_layer for m in model.modules() if getattr(m, "kt_layer", None) is not None]
        inside = [all(lo <= a and a + n <= lo + size for a, n in (l._layer.panel_storage(p) for p in range(3)))
                  for l in layers for lo, size in [_mapping_range(l.shared_store)]]
        result.update(anon_growth=status("RssAnon") - before, packed=sum(l.packed_bytes for l in layers),
                      stores=sorted({l.shared_store for l in layers}), mappings=store_mappings(), inside=inside,
                      threads=kt_sft.engine.num_threads(), summary=model.kt_summary,
                      store_files=sorted(os.listdir(os.environ.get("KT_SFT_SHM_DIR", "/dev/shm"))))
        if mode == "die" and rank == 1:
            os._exit(3)
        if mode in ("train", "die", "fsdp"):
            result.update(train(model, rank, fsdp=mode == "fsdp"))
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()

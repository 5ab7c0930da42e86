"""Data parallel with the CPU expert engine: N ranks per host, started the way stock LLaMA-Factory starts them
(torchrun / `accelerate launch`: `FORCE_TORCHRUN=1 NPROC_PER_NODE=N [NNODES, NODE_RANK, MASTER_ADDR, ...]`),
share one copy of the routed experts per host, and keep identical adapters.

- `join` (at the start of `kt_sft.load_model`, when a process group of more than one rank is up): one gloo
  group of every rank (`group`; gloo also when the default group is NCCL: the expert-LoRA gradients are CPU
  tensors), one all-gather of who is where (host, node, local rank, pid) and of the load settings, which every
  rank must share (a mismatch is an error naming the setting and the ranks). A host is the ranks with the same
  host name and node rank (torchrun's GROUP_RANK): two "nodes" on one machine keep two stores.
- `shared_experts`: the host's lowest rank packs the experts into a shared store (kt_sft.engine.shared_store,
  a file in /dev/shm) while the others read only the dense tensors; then every rank agrees (an all-gather of
  errors: a failure on one rank stops all, with its message), the others map the store read-only, all agree
  again, and the packer unlinks the file: nothing is left in /dev/shm, however the ranks end later.
- `threads_per_rank`: the engine's threads of each rank when nothing sets them: the cores / the host's ranks.
- `share_expert_grads` (after PEFT set-up): the expert-LoRA factors are fp32 CPU parameters, which DDP (NCCL)
  cannot reduce; they are taken out of DDP (`_ddp_params_and_buffers_to_ignore`), broadcast from rank 0 once,
  and their gradients averaged over the gloo group at the end of each backward that syncs (accelerate's
  `sync_gradients`: the last micro-batch of a gradient-accumulation step), before the Trainer clips and steps,
  exactly as DDP averages the dense LoRA's.
- FSDP2 (`set_fsdp`, from the LLaMA-Factory hook when accelerate shards the model): the dense part is sharded by
  accelerate's `fully_shard` instead of replicated by DDP; the expert-LoRA factors stay out of it
  (`fsdp_ignored_modules`, which the hook hands to accelerate's FSDP plugin as its ignored modules) and are averaged
  as above, and `clip_grad_norm` clips FSDP's sharded gradients and theirs together, as one norm.
Every collective here runs on the gloo group with the timeout `set_timeout` gave (the LLaMA-Factory hook: the
run's `ddp_timeout`), and a failed one (a rank died or timed out) raises an error saying so.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import socket
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

_timeout = datetime.timedelta(minutes=30)  # torch's default for gloo; set_timeout(ddp_timeout) under LLaMA-Factory
_host: Optional["HostGroup"] = None
_fsdp = False  # FSDP2 shards the dense part (set_fsdp), instead of DDP replicating it


def set_timeout(seconds: float) -> None:
    """The timeout of kt-sft's collectives (a rank that stops answering fails the others after this long)."""
    global _timeout
    _timeout = datetime.timedelta(seconds=float(seconds))


def set_fsdp(on: bool) -> None:
    """Whether accelerate shards the dense part with FSDP2 in this run (the LLaMA-Factory hook says so before the
    model loads: the dense weights then load to host RAM, and the expert factors stay out of FSDP)."""
    global _fsdp
    _fsdp = bool(on)


def fsdp() -> bool:
    return _fsdp


@dataclasses.dataclass(frozen=True)
class RankInfo:
    rank: int
    host: str         # host name and node rank: the ranks that share one store
    local_rank: int
    pid: int


@dataclasses.dataclass
class HostGroup:
    """This rank's place among all ranks, and the gloo group kt-sft's collectives run on."""

    rank: int
    ranks: list[RankInfo]
    group: Any  # torch.distributed.ProcessGroup (gloo)

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def me(self) -> RankInfo:
        return self.ranks[self.rank]

    @property
    def local(self) -> list[RankInfo]:
        """The ranks on this host, lowest first."""
        return [r for r in self.ranks if r.host == self.me.host]

    @property
    def packer(self) -> RankInfo:
        return self.local[0]

    @property
    def packs(self) -> bool:
        return self.packer.rank == self.rank

    @property
    def hosts(self) -> int:
        return len({r.host for r in self.ranks})

    def agree(self, error: Optional[str], what: str) -> None:
        """A barrier that also tells every rank whether any failed: each rank's error (None: fine) goes to all,
        and every rank raises the first one (a failing rank raises its own exception itself)."""
        errors: list = [None] * self.world_size
        with collective(what):
            torch.distributed.all_gather_object(errors, error, group=self.group)
        failed = [(rank, e) for rank, e in enumerate(errors) if e]
        if failed and error is None:
            rank, e = failed[0]
            raise RuntimeError(f"kt-sft: {what} failed on rank {rank} ({self.ranks[rank].host}): {e}")

    def together(self, fn: Callable[[], Any], what: str) -> Any:
        """fn() on every rank, then `agree`: all ranks go on, or all stop with the first failure."""
        try:
            result = fn()
        except Exception as err:
            self.agree(f"{type(err).__name__}: {err}", what)
            raise
        self.agree(None, what)
        return result


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed collective (a rank died, or did not answer within the timeout) into an error that says so."""
    try:
        yield
    except RuntimeError as err:  # torch.distributed.DistBackendError is one
        raise RuntimeError(f"kt-sft: {what}: another rank stopped answering (it died, or took longer than the "
                           f"collective timeout of {_timeout.total_seconds():.0f} s, ddp_timeout): {err}") from err


def _host_name() -> str:
    node = os.environ.get("GROUP_RANK")  # torchrun's node rank
    if node is None and os.environ.get("LOCAL_WORLD_SIZE"):
        node = str(int(os.environ.get("RANK", "0")) // int(os.environ["LOCAL_WORLD_SIZE"]))
    return socket.gethostname() + (f"-node{node}" if node is not None else "")


def join(settings: dict) -> Optional[HostGroup]:
    """The HostGroup of this process (made at the first call), or None outside a process group of more than one
    rank. `settings`: what every rank must agree on (name -> comparable value); a mismatch raises, naming it."""
    global _host
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    group = _host.group if _host is not None else dist.new_group(backend="gloo", timeout=_timeout)
    me = RankInfo(dist.get_rank(), _host_name(), int(os.environ.get("LOCAL_RANK", 0)), os.getpid())
    gathered: list = [None] * dist.get_world_size()
    with collective("joining the ranks"):
        dist.all_gather_object(gathered, (me, settings), group=group)
    _host = HostGroup(me.rank, [info for info, _ in gathered], group)
    _check_same(_host, [s for _, s in gathered])
    return _host


def current() -> Optional[HostGroup]:
    """The HostGroup `join` made (None before, or outside a multi-rank process group)."""
    return _host


def _check_same(host: HostGroup, settings: Sequence[dict]) -> None:
    for name in sorted(set().union(*settings)):
        values = [s.get(name) for s in settings]
        if any(v != values[0] for v in values):
            shown = "; ".join(f"rank {r} ({host.ranks[r].host}): {v!r}" for r, v in enumerate(values))
            raise ValueError(f"kt-sft: the ranks disagree on {name} ({shown}); every rank must load the model with "
                             "the same kt_* settings (give every node the same YAML and checkpoint)")


def threads_per_rank(cores: int, host: HostGroup) -> int:
    """A rank's engine threads when nothing sets them: the host's cores split among its ranks (at least one)."""
    return max(1, cores // len(host.local))


@contextlib.contextmanager
def shared_experts(host: Optional[HostGroup], layers: Sequence) -> Iterator[bool]:
    """Around loading the weights: yields whether this rank packs the experts (without a host group: True, into
    private memory). The packer's layers live in a new shared store; once all ranks loaded their part, the others
    map it read-only and the packer removes its name."""
    from .engine.shared_store import SharedExpertStore, store_path

    if host is None:
        yield True
        return
    path = store_path(host.me.host, host.packer.pid)
    store = None
    try:
        try:
            if host.packs:
                store = SharedExpertStore.create(path, layers)
            yield host.packs
        except Exception as err:
            host.agree(f"{type(err).__name__}: {err}", "loading the model")
            raise
        host.agree(None, "loading the model")
        host.together(lambda: None if host.packs else SharedExpertStore.open(path, layers),
                      "mapping the host's shared experts")
    finally:
        if store is not None:
            store.unlink()


def store_summary(host: Optional[HostGroup], layers: Sequence) -> str:
    """The summary's note on the shared store ("" without one)."""
    if host is None or not layers or layers[0].shared_store is None:
        return ""
    return (f"; experts shared by {len(host.local)} rank(s) of this host ({host.hosts} host(s), "
            f"{host.world_size} ranks)")


# ---------------------------------------------------------------- expert-LoRA gradients
BUCKET_BYTES = 64 << 20  # gradients averaged per flat bucket of at most this size (bounds the extra memory)


def _sync_step() -> bool:
    """Whether this backward ends a gradient-accumulation step (accelerate's flag, which the Trainer sets per
    micro-batch; True outside accelerate)."""
    try:
        from accelerate.state import GradientState
    except ImportError:
        return True
    return bool(GradientState().sync_gradients)


def _buckets(params: Sequence[torch.Tensor]) -> Iterator[list]:
    bucket, size = [], 0
    for p in params:
        if bucket and size + p.numel() * p.element_size() > BUCKET_BYTES:
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel() * p.element_size()
    if bucket:
        yield bucket


def broadcast_from_first(host: HostGroup, params: Sequence[torch.Tensor], what: str) -> None:
    """Rank 0's values of `params` (CPU tensors) on every rank, in flat buckets over the gloo group."""
    with torch.no_grad(), collective(what):
        for bucket in _buckets(params):
            flat = torch._utils._flatten_dense_tensors([p.data for p in bucket])
            torch.distributed.broadcast(flat, src=0, group=host.group)
            for p, value in zip(bucket, torch._utils._unflatten_dense_tensors(flat, [p.data for p in bucket])):
                p.data.copy_(value)


class ExpertGradAverager:
    """Averages the gradients of the expert-LoRA factors (fp32 CPU parameters outside DDP) over every rank, once
    per optimizer step, as DDP averages the others: each rank divides by the world size, then the gloo group sums
    (buckets of BUCKET_BYTES). A global optimizer pre-step hook refuses a step whose expert gradients were not
    averaged (a backward that did not start from the model's output)."""

    def __init__(self, host: HostGroup, model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self.host, self.params = host, list(params)
        self._queued = self._pending = False
        self._broadcast()
        model.register_forward_hook(self._mark_outputs)
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._accumulated)
        register_optimizer_step_pre_hook(self._check_averaged)

    def _broadcast(self) -> None:
        """Every rank starts from rank 0's factors (as DDP does for the parameters it wraps)."""
        broadcast_from_first(self.host, self.params, "broadcasting the expert-LoRA factors")

    def _mark_outputs(self, module, args, output) -> None:
        """Forward hook of the PEFT model: a gradient hook on each output that carries gradients (loss, logits).
        Such a hook runs in the outermost graph task (the one loss.backward() started; a reentrant checkpoint's
        recompute runs its own tasks inside it), and queues the averaging for that task's end, when every
        expert-LoRA gradient of the step has been accumulated."""
        if not torch.is_grad_enabled():
            return
        values = output.values() if isinstance(output, dict) else output if isinstance(output, tuple) else [output]
        for value in values:
            if isinstance(value, torch.Tensor) and value.requires_grad:
                value.register_hook(self._queue)

    def _queue(self, grad) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._at_backward_end)

    def _accumulated(self, param) -> None:
        self._pending = True

    def _at_backward_end(self) -> None:
        self._queued = False
        if _sync_step():
            self.average()

    def average(self) -> None:
        """grad <- the mean over every rank of each factor's gradient (a missing one counts as zeros)."""
        world = self.host.world_size
        with torch.no_grad(), collective("averaging the expert-LoRA gradients"):
            for bucket in _buckets(self.params):
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
                flat = torch._utils._flatten_dense_tensors(grads).div_(world)
                torch.distributed.all_reduce(flat, group=self.host.group)
                for p, value in zip(bucket, torch._utils._unflatten_dense_tensors(flat, grads)):
                    p.grad = value
        self._pending = False

    def _check_averaged(self, optimizer, args, kwargs) -> None:
        if self._pending:
            raise RuntimeError("kt-sft: an optimizer step with expert-LoRA gradients that were not averaged across "
                               "the ranks: the backward did not start from what the model returned (its loss or "
                               "logits), where kt-sft hooks the averaging in")


def share_expert_grads(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> Optional[ExpertGradAverager]:
    """Under data parallel (`join` made a HostGroup): take the expert-LoRA factors `params` out of DDP and average
    their gradients over the ranks instead (ExpertGradAverager). None when there is nothing to do. Under FSDP2 the
    factors stay out of it through `fsdp_ignored_modules` (accelerate's plugin reads them when it shards)."""
    host = current()
    trainable = [p for p in params if p.requires_grad]
    if host is None or not trainable:
        return None
    if _fsdp:  # FSDP shards frozen weights too: no trainable dense parameter is needed
        return ExpertGradAverager(host, model, trainable)
    ours = {id(p) for p in params}
    names = [n for n, p in model.named_parameters() if id(p) in ours]
    if not any(p.requires_grad and id(p) not in ours for p in model.parameters()):
        raise ValueError("kt-sft: under data parallel, lora_target must train at least one module besides the "
                         "routed experts (DDP wraps those; the expert factors are averaged by kt-sft): add e.g. "
                         "q_proj, or use lora_target: all,experts")
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", None) or [])
    model._ddp_params_and_buffers_to_ignore = list(dict.fromkeys([*ignored, *names]))
    return ExpertGradAverager(host, model, trainable)


# ---------------------------------------------------------------- FSDP2
def before_sharding(model: torch.nn.Module, factors: Sequence[torch.nn.Parameter]) -> None:
    """Before FSDP2 shards the model: every rank's trainable parameters (the dense LoRA, in host RAM then) become
    rank 0's, as DDP's wrap and accelerate's rank-0 loading make them; FSDP2 keeps each rank's own slice, so ranks
    that initialised the adapter apart would otherwise train a mix of their inits. The expert-LoRA `factors` were
    broadcast when their averaging was set up (DeepSeek-V3 r=8: 9.7 GB; not twice)."""
    host, skip = current(), {id(p) for p in factors}
    trainable = [p for p in model.parameters() if p.requires_grad and p.device.type == "cpu" and id(p) not in skip]
    if host is not None and trainable:
        broadcast_from_first(host, trainable, "broadcasting the LoRA before FSDP shards it")


@contextlib.contextmanager
def frozen_dtype_kept(model: torch.nn.Module) -> Iterator[None]:
    """While accelerate prepares FSDP2: its upcast of the whole model under mixed precision (`model.to(torch.float32)`,
    fp32 masters for what trains) leaves the frozen parameters in their dtype. Their bf16 compute copy is the same
    values either way, and each card keeps 2 bytes per frozen parameter instead of 4; trainable parameters,
    gradients and buffers are upcast as accelerate does. Any other `to` call is the module's own."""
    keep = lambda t: (isinstance(t, torch.nn.Parameter) and not t.requires_grad) or not t.is_floating_point()

    def to(*args, **kwargs):
        if (args, kwargs) in (((torch.float32,), {}), ((), {"dtype": torch.float32})):
            return model._apply(lambda t: t if keep(t) else t.to(torch.float32))
        return type(model).to(model, *args, **kwargs)

    model.__dict__["to"] = to  # this instance only, for the prepare call
    try:
        yield
    finally:
        model.__dict__.pop("to", None)


def fsdp_ignored_modules(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> list[torch.nn.Module]:
    """The modules whose parameters are all among `params` (the expert-LoRA factors: fp32 CPU tensors the engine
    reads, which FSDP must neither shard nor move), outermost first: accelerate's FSDP2 plugin takes modules, not
    parameters, as what `fully_shard` ignores. Every factor lies in one of them (PEFT's ParamWrapper of a routed
    experts module holds only its factors: the engine holds the experts' weights)."""
    ours = {id(p) for p in params}
    modules, covered = [], set()
    for module in model.modules():
        own = [id(p) for p in module.parameters()]
        if own and all(i in ours for i in own) and not covered.issuperset(own):
            modules.append(module)
            covered.update(own)
    missing = ours - covered
    if missing:  # a factor in a module beside other parameters: FSDP would shard it
        raise RuntimeError(f"kt-sft: {len(missing)} expert-LoRA factor(s) share a module with other parameters; "
                           "FSDP cannot leave them out")
    return modules


def clip_grad_norm(parameters: Sequence[torch.nn.Parameter], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over FSDP2's sharded parameters (DTensors) and the expert-LoRA factors (plain
    tensors on the CPU, their gradients already averaged, equal on every rank) together, which torch's own refuses
    to mix: the total norm of both (the DTensors' over all their shards), and every gradient scaled by the one
    coefficient it gives, as stock clips a model whose parameters FSDP holds all. Returns the total norm."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    groups = [g for g in ([p for p in params if isinstance(p, DTensor)],
                          [p for p in params if not isinstance(p, DTensor)]) if g]
    norms = []
    for group in groups:
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type)
        norms.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float().cpu())
    total = torch.nn.utils.get_total_norm(norms, norm_type) if norms else torch.tensor(0.0)  # the norm of norms
    for group in groups:
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def split_param_groups(optimizer: torch.optim.Optimizer) -> None:
    """Each param group of `optimizer` that holds both FSDP2's DTensors and plain tensors (the expert-LoRA factors)
    becomes two with the same settings, so that torch's foreach and fused steps, which batch a group's tensors by
    device and refuse to mix the two kinds, never get both (on a CPU mesh both are CPU tensors). Each parameter's
    update is the same either way (the step is per parameter, a schedule scales every group alike)."""
    from torch.distributed.tensor import DTensor

    for group in list(optimizer.param_groups):
        plain = [p for p in group["params"] if not isinstance(p, DTensor)]
        if plain and len(plain) < len(group["params"]):
            group["params"] = [p for p in group["params"] if isinstance(p, DTensor)]
            optimizer.param_groups.append({**group, "params": plain})


def reload_adapter_after_fsdp_load(model: torch.nn.Module, checkpoint: str) -> None:
    """After accelerate loads a FULL_STATE_DICT FSDP2 checkpoint into a PEFT model (a resume): that checkpoint's
    `pytorch_model_fsdp.bin` holds rank 0's shards of the LoRA only (accelerate 1.11 saves PEFT's state dict of
    the sharded model as it is) and the other ranks keep their own, so the LoRA is reloaded from the checkpoint's
    `adapter_model.safetensors` (full tensors, saved through accelerate's gathering path), each rank taking its
    shard."""
    from pathlib import Path

    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    path = Path(checkpoint) / "adapter_model.safetensors"
    if not path.is_file():
        return
    adapter = getattr(model, "active_adapter", "default")
    names = {n.replace(f".{adapter}.", "."): n for n, p in model.named_parameters() if p.requires_grad}
    saved = load_file(str(path))
    missing = sorted(set(names) - set(saved))
    if missing:
        raise RuntimeError(f"kt-sft: {path} lacks {len(missing)} trained tensor(s) of the model (first: "
                           f"{missing[0]}), so the FSDP2 checkpoint cannot be resumed exactly; start a new run from "
                           "its adapter (adapter_name_or_path) instead")
    set_model_state_dict(model, {names[k]: v for k, v in saved.items() if k in names},
                         options=StateDictOptions(full_state_dict=True, strict=False))

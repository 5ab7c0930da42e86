"""Merge LoRA adapters into their base checkpoint: a standalone Hugging Face checkpoint, streamed shard by shard.

`export_checkpoint(model, adapters, out)` (also `python -m kt_sft export` and `USE_KT=1 llamafactory-cli export`
with `use_kt: true`) never builds the model with weights and never needs a GPU:

  plan     config.json, the model built on the meta device (no weights: names, shapes, which modules are the
           routed experts), the family rule (the experts' keys on disk, kt_sft.models), every shard's header, the
           adapters read and checked against the model (kt_sft.adapter_merge), and each output tensor's name,
           dtype, shape and output shard: all before a weight is read, so bad input fails with nothing written
  stream   in the base's shard and key order, one tensor at a time (a fused [E, ...] expert tensor one expert at a
           time): read, decoded to fp32 when stored quantized, the adapters' deltas added in fp32 where they have
           any, and written straight into its output shard (kt_sft.safetensors_stream: header first, then bytes)
  finish   config.json (no quantization_config unless the output is FP8, no engine keys), generation_config.json,
           the base's tokenizer and other small files, the index; the temporary directory next to `out` is then
           renamed to `out`, so a failure (a full disk included) leaves no half-written checkpoint

Output tensors keep the base's keys and layout (per-expert or fused experts, key prefixes): a quantized weight
becomes `X.weight` in bf16 (INT4's `X.weight_packed` too; scales dropped), tensors stored as floats keep their
dtype; `dtype` casts every float tensor instead. `format="fp8"` (from a block-FP8 base only) keeps every weight the
base stores in block FP8 in that format: untouched ones byte for byte, merged ones requantized on the base's own
block grid (s = max |w| / 448 per block, e4m3 round-to-nearest-even; what the engine's FP8 packer computes), and
keeps the quantization_config. Peak host RAM: the input shard being read (mmap) + one merged tensor in fp32 + the
adapters' tensors.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from tqdm.auto import tqdm

from .adapter_merge import ParamEdit, read_adapters
from .checkpoint_files import CheckpointFiles, TensorReader, scan
from .checkpoint_formats import (COMPANION_SUFFIXES, SourceFormat, check_stored, decode, is_companion, is_quantized,
                                 logical_shape, stored_linear)
from .models.registry import MoEFamily
from .safetensors_stream import Entry, SafetensorsWriter

logger = logging.getLogger(__name__)

FORMATS = ("bf16", "fp8")
DECODED_DTYPE = torch.bfloat16  # what a quantized weight becomes unless `dtype` says otherwise
FP8_MAX = 448.0
COPY_STEP_BYTES = 64 << 20  # rows per read when a tensor is copied as stored
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
WRITTEN_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
ENGINE_KEYS = ("experts_implementation", "_experts_implementation")  # kt-sft's engine dispatch, if ever saved


@dataclass
class Item:
    """One tensor of the base (with its companions) and what the export writes for it."""

    key: str                          # its key in the base checkpoint
    shard: Path                       # the shard it is read from
    outputs: list                     # the Entry(s) written for it, in order
    action: str                       # copy (bytes as stored) | float (to outputs[0].dtype) | fp8 (requantized)
    edit: Optional[ParamEdit] = None  # what the adapters do to it
    expert: Optional[tuple] = None    # a routed expert's (projection, expert index or None for a fused tensor,
    #                                   the rule of its experts module)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.outputs)


@dataclass
class ExportPlan:
    """What `export_checkpoint` writes, decided before any weight is read (`plan_export`)."""

    base: Path
    out: Path
    source: SourceFormat
    format: str
    family: MoEFamily
    files: CheckpointFiles
    config: dict                      # the config.json written
    generation: object                # a GenerationConfig to write when the base has no generation_config.json
    shards: list                      # output shards, each a list of Items
    edits: dict = field(default_factory=dict)
    extra_dirs: tuple = ()            # directories whose small files (tokenizer, ...) are copied, later ones win

    @property
    def total_bytes(self) -> int:
        return sum(item.nbytes for shard in self.shards for item in shard)

    def summary(self) -> str:
        base = f"a {self.source} base" if self.source.quantized else "an unquantized base"
        return (f"kt-sft: merged {len(self.edits)} adapted tensors into {self.out} ({self.format} output from {base}): "
                f"{len(self.shards)} shard(s), {self.total_bytes / 1e9:.2f} GB")

    def shard_name(self, i: int) -> str:
        n = len(self.shards)
        return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def parse_size(size) -> int:
    """Bytes of a shard size: an int, or "5GB" / "500MB" / "2GiB" as transformers' max_shard_size reads them."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = convert_file_size_to_int(size if isinstance(size, int) else str(size).strip())
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"shard size {size!r}: expected a positive size such as 5GB, 500MB or 2GiB")
    return value


def plan_export(model, adapters, out, *, shard_size="5GB", format: str = "bf16",
                dtype: Optional[torch.dtype] = None, expert_path=None, tokenizer=None, rule=None,
                family: Optional[MoEFamily] = None) -> ExportPlan:
    """Every check and decision of `export_checkpoint` (same arguments), from config.json, the shards' headers and
    the adapters alone; nothing is written. The model is built on the meta device as the loader builds it (its
    plan steps: kt_sft.loader), so keys route to the same parameters as when kt-sft loads the checkpoint."""
    from .loader import _experts_modules, _KeyRouter, _Placer, _resolve_model, expert_counts
    from .models.derive import build_meta, resolve_family

    base, out = Path(model), Path(out)
    adapters = [Path(a) for a in ([adapters] if isinstance(adapters, (str, os.PathLike)) else adapters or [])]
    max_bytes = _check_arguments(out, adapters, shard_size, format)
    config, given, source = _resolve_model(base, None, family, rule)
    if format == "fp8" and source.name != "fp8-block":
        raise ValueError(f"export format fp8 (kt_export_format / --format) requantizes merged weights into the "
                         f"base's block FP8, but {base} is stored as {source}; use bf16")
    meta = build_meta(config, buffers=False)
    family = resolve_family(meta, config.model_type, given)
    edits = read_adapters(adapters, meta, str(base), _vocab_params(meta))
    files = scan(base, expert_path)
    reader = TensorReader(files)
    check_stored(source, files.headers, reader.get, where=lambda key: f"in {files.shard_of(key)}")
    placer = _Placer(meta, torch.device("cpu"), torch.float32)
    modules = _experts_modules(meta, family)
    context = _PlanContext(files, source, format, dtype, family, edits, set(modules),
                           _KeyRouter(family, files.headers, placer.renamings, expert_counts(modules)), placer, reader)
    items = context.items()
    _check_all_applied(edits, context.applied, base)
    generation = None if (base / "generation_config.json").is_file() else _generation_config(config)
    plan = ExportPlan(base, out, source, format, family, files, _output_config(base, edits, source, format, dtype,
                                                                               meta), generation,
                      _into_shards(items, max_bytes), edits, (Path(tokenizer),) if tokenizer else ())
    _check_space(out, plan.total_bytes)
    return plan


def _check_arguments(out: Path, adapters: list, shard_size, format: str) -> int:
    """The arguments that need no file read; returns the shard size in bytes."""
    _check_out(out)
    max_bytes = parse_size(shard_size)
    if format not in FORMATS:
        raise ValueError(f"export format {format!r}: expected one of {', '.join(FORMATS)}")
    if not adapters:
        raise ValueError("no adapter given (adapter_name_or_path / --adapter): the export merges a LoRA adapter "
                         "into its base, and without one the base already is the standalone checkpoint")
    return max_bytes


@dataclass
class _PlanContext:
    """What deciding each item needs (plan_export's state)."""

    files: CheckpointFiles
    source: SourceFormat
    format: str
    dtype: Optional[torch.dtype]
    family: MoEFamily
    edits: dict
    moe_layers: set
    router: object
    placer: object
    reader: TensorReader
    applied: set = field(default_factory=set)

    def items(self) -> list:
        out = []
        for shard, kinds in self.files.sources.items():
            for key in self.files.keys[shard]:
                if is_companion(key):
                    continue
                route = self.router.expert(key)
                expert = route is not None and route[1] in self.moe_layers
                if (kinds == "dense" and expert) or (kinds == "experts" and not expert):
                    continue
                out.append(self.item(key, shard, route if expert else None))
        return out

    def edit_of(self, key: str, route) -> Optional[ParamEdit]:
        if route is not None:
            proj, at, _ = route
            rule = self.router.rule(at)
            fused = "gate_up" if proj in ("gate", "up") and rule.gated else proj
            name = f"{rule.experts_module.format(layer=at.layer)}.{fused}_proj"
        else:
            name = self.placer.name_of(self.router.logical(key))
        if name in self.edits:
            self.applied.add(name)
            return self.edits[name]
        return None

    def item(self, key: str, shard: Path, route) -> Item:
        dtype, shape = self.files.headers[key]
        edit = self.edit_of(key, route)
        expert = None if route is None else (route[0], route[2], self.router.rule(route[1]))
        if is_quantized(key, dtype):
            if self.format == "fp8":
                companions = [Entry(c, *self.files.headers[c]) for c in _companions(key, self.files.headers)]
                if edit is None:
                    return Item(key, shard, [Entry(key, dtype, shape), *companions], "copy", None, expert)
                return Item(key, shard, [Entry(key, dtype, shape), *companions], "fp8", edit, expert)
            name = stored_linear(key) + ".weight"
            out = Entry(name, self.dtype or DECODED_DTYPE, logical_shape(key, shape, self.reader.get))
            return Item(key, shard, [out], "float", edit, expert)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            return Item(key, shard, [Entry(key, dtype, shape)], "copy", None, expert)
        replaced = edit is not None and edit.replacement is not None
        out = Entry(key, self.dtype or dtype, edit.shape if replaced else shape)
        action = "copy" if edit is None and out.dtype == dtype else "float"
        return Item(key, shard, [out], action, edit, expert)


def _companions(key: str, headers: dict) -> list[str]:
    """The scale tensors stored beside the quantized weight `key`, scale first."""
    linear = stored_linear(key)
    return [linear + s for s in COMPANION_SUFFIXES if linear + s in headers]


def _vocab_params(meta) -> set:
    """Names of the input / output embedding weights (a replacement may resize their vocabulary)."""
    wanted = [m.weight for m in (meta.get_input_embeddings(), meta.get_output_embeddings()) if m is not None]
    return {n for n, p in meta.named_parameters() if any(p is w for w in wanted)}


def _check_all_applied(edits: dict, applied: set, base: Path) -> None:
    missing = sorted(set(edits) - applied)
    if missing:
        raise ValueError(f"the adapter changes {missing[0]} ({len(missing)} parameters in all), which {base} stores "
                         "under no key (tied to another weight, e.g. lm_head to the input embeddings?): the merged "
                         "weight would be lost; train without LoRA on it")


def _into_shards(items: list, max_bytes: int) -> list:
    """Items in order into shards of at most `max_bytes` (one larger item gets a shard of its own), as
    save_pretrained's max_shard_size splits a state dict; a weight and its scales stay together."""
    shards, current, size = [], [], 0
    for item in items:
        if current and size + item.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item.nbytes
    return shards + [current] if current else shards


# ---------------------------------------------------------------------------------------------- checks

def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _check_out(out: Path) -> None:
    """`out` is new or an empty directory, and the export can write next to it."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"export directory {out} exists and is not empty; give a new or empty directory (the "
                              "export never overwrites a checkpoint)")
    ancestor = _existing_ancestor(out.parent)
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"export directory {out}: {ancestor} is not a writable directory")


def _check_space(out: Path, nbytes: int) -> None:
    free = shutil.disk_usage(_existing_ancestor(out.parent)).free
    if nbytes > free:
        raise OSError(f"export directory {out}: the merged checkpoint needs {nbytes / 1e9:.2f} GB, but its disk has "
                      f"{free / 1e9:.2f} GB free")


# ---------------------------------------------------------------------------------------------- config files

def _output_config(base: Path, edits: dict, source: SourceFormat, format: str, dtype: Optional[torch.dtype],
                   meta) -> dict:
    """The base's config.json as written (its own fields, custom ones included) without what no longer holds:
    the quantization_config (kept for FP8 output), kt-sft's engine keys; the dtype of a dequantized or cast
    checkpoint, and a vocabulary resized by a replaced embedding."""
    config = json.loads((base / "config.json").read_text())
    if format != "fp8":
        config.pop("quantization_config", None)
    for key in list(config):
        if key.startswith("kt_") or (key in ENGINE_KEYS and config[key] == "kt"):
            del config[key]
    out_dtype = dtype or (DECODED_DTYPE if source.quantized and format != "fp8" else None)
    if out_dtype is not None:
        config["dtype"] = str(out_dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    resized = [edits[n].shape[0] for n in _vocab_params(meta) if n in edits and edits[n].replacement is not None]
    if resized and "vocab_size" in config:
        config["vocab_size"] = max(resized)
    return config


def _generation_config(config):
    """What save_pretrained writes for a generating model whose checkpoint has no generation_config.json."""
    from transformers import GenerationConfig

    return GenerationConfig.from_model_config(config)


def _copy_small_files(src: Path, dst: Path) -> None:
    """The files of a model directory that are not weights or written by the export: tokenizer, chat template,
    remote code, license, ... (sub-directories and hidden files stay behind)."""
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.startswith(".") and not path.name.endswith(WEIGHT_FILES) \
                and path.name not in WRITTEN_FILES and not path.name.endswith(".index.json"):
            shutil.copy2(path, dst / path.name)


def _finish_files(plan: ExportPlan, tmp: Path, weight_map: dict) -> None:
    _copy_small_files(plan.base, tmp)
    for extra in plan.extra_dirs:
        _copy_small_files(extra, tmp)
    (tmp / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    if plan.generation is not None:
        plan.generation.save_pretrained(tmp)
    else:
        shutil.copy2(plan.base / "generation_config.json", tmp / "generation_config.json")
    if len(plan.shards) > 1:
        index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- streaming

def quantize_fp8_blocks(w: torch.Tensor, block: tuple, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes [N, K], scales [ceil(N/Bn), ceil(K/Bk)]) of fp32 `w` on blocks of Bn x Bk (edge blocks partial):
    s = max |w| / 448 per block, rounded to `scale_dtype`, codes = e4m3(w / s) (round to nearest even, saturating;
    s = 0: 0), so that decode(codes, s) = fl32(code * s) as for the base's own tensors."""
    (n, k), (bn, bk) = w.shape, block
    padded = torch.nn.functional.pad(w, (0, -k % bk, 0, -n % bn))
    blocks = padded.view(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).to(scale_dtype)
    s = scale.float()[:, None, :, None]
    ratio = torch.where(s > 0, blocks / torch.where(s > 0, s, 1.0), 0.0)
    codes = ratio.clamp(-FP8_MAX, FP8_MAX).view_as(padded)[:n, :k].to(torch.float8_e4m3fn)
    return codes, scale


def _expert_delta(item: Item, e: int, whole: bool) -> Optional[torch.Tensor]:
    """The summed adapters' delta of expert e's tensor of `item`: the whole [d1, d2] slice of a fused tensor
    (`whole`), or a per-expert [out, in] weight (gate: the first half of gate_up's outputs, up: the second)."""
    edit, total = item.edit, None
    proj, _, family = item.expert
    outputs = edit.shape[2] if family.transposed else edit.shape[1]
    half = slice(0, outputs // 2) if proj == "gate" else slice(outputs // 2, None) \
        if proj == "up" and family.gated else None
    for lora in edit.loras:
        if whole:
            delta = lora.expert_delta(e)
        else:
            delta = lora.expert_delta(e, cols=half).T if family.transposed else lora.expert_delta(e, rows=half)
        total = delta if total is None else total + delta
    return total


def _merged(item: Item, reader: TensorReader, plan: ExportPlan) -> torch.Tensor:
    """The tensor of a (non-fused) item with the adapters' edits applied, fp32 when anything was added."""
    edit = item.edit
    if edit is not None and edit.replacement is not None:
        w = edit.replacement
    else:
        w = reader.get(item.key)
        if is_quantized(item.key, w.dtype):
            w = decode(plan.source, item.key, lambda k: w if k == item.key else reader.get(k))
    if edit is None or not edit.loras:
        return w
    if item.expert is not None:
        return w.float() + _expert_delta(item, item.expert[1], whole=False)
    return w.float() + sum(lora.delta() for lora in edit.loras)


def _fused_experts(item: Item, reader: TensorReader, plan: ExportPlan, dtype: torch.dtype) -> Iterator:
    """A fused [E, ...] expert tensor one expert at a time (read as a slice, its delta added)."""
    stored = reader.get_slice(item.key)
    for e in range(item.outputs[0].shape[0]):
        w = stored[e]
        if item.edit is not None and item.edit.loras:
            w = w.float() + _expert_delta(item, e, whole=True)
        yield w.to(dtype)


def _stored_rows(reader: TensorReader, entry: Entry) -> Iterator[torch.Tensor]:
    """A tensor as stored, a block of rows (~COPY_STEP_BYTES) at a time: copying holds no whole tensor."""
    if not entry.shape:
        yield reader.get(entry.name)
        return
    step = max(1, COPY_STEP_BYTES * entry.shape[0] // max(entry.nbytes, 1))
    rows = reader.get_slice(entry.name)
    for r in range(0, entry.shape[0], step):
        yield rows[r: r + step]


def _item_tensors(item: Item, reader: TensorReader, plan: ExportPlan) -> Iterator[tuple]:
    """(name, pieces) of each output of `item`, in its order."""
    first = item.outputs[0]
    if item.action == "copy":
        for entry in item.outputs:
            yield entry.name, _stored_rows(reader, entry)
    elif item.action == "fp8":
        codes, scale = quantize_fp8_blocks(_merged(item, reader, plan).float(), plan.source.block,
                                           item.outputs[1].dtype)
        yield first.name, [codes]
        yield item.outputs[1].name, [scale]
        for entry in item.outputs[2:]:
            yield entry.name, _stored_rows(reader, entry)
    elif item.expert is not None and item.expert[1] is None:
        yield first.name, _fused_experts(item, reader, plan, first.dtype)
    else:
        yield first.name, [_merged(item, reader, plan).to(first.dtype)]


def _write_shards(plan: ExportPlan, tmp: Path, progress: bool) -> dict:
    """Every output shard into `tmp`, streamed; returns the index's weight map."""
    reader, weight_map = TensorReader(plan.files), {}
    with tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="kt-sft: exporting",
              disable=not progress) as bar:
        for i, items in enumerate(plan.shards):
            name = plan.shard_name(i)
            writer = SafetensorsWriter(tmp / name, [e for item in items for e in item.outputs])
            try:
                for item in items:
                    if reader.current != item.shard:
                        reader.use(item.shard)
                    for tensor_name, pieces in _item_tensors(item, reader, plan):
                        writer.write(tensor_name, pieces)
                    bar.update(item.nbytes)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            weight_map.update({e.name: name for item in items for e in item.outputs})
    return weight_map


def export_checkpoint(model, adapters, out, *, shard_size="5GB", format: str = "bf16",
                      dtype: Optional[torch.dtype] = None, expert_path=None, tokenizer=None, rule=None,
                      family: Optional[MoEFamily] = None, progress: bool = True,
                      finish: Optional[Callable[[Path], None]] = None) -> ExportPlan:
    """Merge `adapters` (one PEFT LoRA directory or a list, applied in order) into the base checkpoint `model`
    and write the standalone result to `out` (new or empty). shard_size: the most bytes per output shard (an int
    or "5GB"); format: "bf16" or "fp8" (see the module docstring); dtype: cast every float tensor to it (None: as
    stored, quantized weights to bf16); expert_path: the directory holding the routed experts' tensors when not
    `model`; tokenizer: a directory whose tokenizer files replace the base's; rule / family: the family rule as
    for load_model; finish(tmp): writes more files into the output before it is renamed into place.
    Returns the plan (kt_sft.export.ExportPlan)."""
    plan = plan_export(model, adapters, out, shard_size=shard_size, format=format, dtype=dtype,
                       expert_path=expert_path, tokenizer=tokenizer, rule=rule, family=family)
    out = plan.out.absolute()
    created = _make_parents(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".kt-sft-export", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would become the checkpoint's mode
        weight_map = _write_shards(plan, tmp, progress)
        _finish_files(plan, tmp, weight_map)
        if finish is not None:
            finish(tmp)
        if out.exists():
            out.rmdir()  # empty (checked by the plan)
        os.rename(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        for made in created:
            shutil.rmtree(made, ignore_errors=True)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"writing the merged checkpoint failed ({err}); {out} was not written (the "
                                     "partial output was removed)") from err
        raise
    logger.info(plan.summary())
    return plan


def _make_parents(path: Path) -> list:
    """mkdir -p `path`; returns the directories it created, outermost first (removed again on failure)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for p in reversed(missing):
        p.mkdir()
    return missing[::-1]


# ---------------------------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    """`python -m kt_sft export --model DIR --adapter DIR --out DIR [--shard-size 5GB] [--format bf16|fp8]`."""
    parser = argparse.ArgumentParser(prog="python -m kt_sft export", description="Merge LoRA adapters into their "
                                     "base checkpoint, streamed shard by shard (no GPU, RAM ~ one shard).")
    parser.add_argument("--model", required=True, help="the base checkpoint directory")
    parser.add_argument("--adapter", required=True, action="append", help="a PEFT LoRA adapter directory "
                        "(repeat to merge several, in order)")
    parser.add_argument("--out", required=True, help="the new (or empty) output directory")
    parser.add_argument("--shard-size", default="5GB", help="most bytes per output shard (default 5GB)")
    parser.add_argument("--format", default="bf16", choices=FORMATS, help="bf16 (default) or fp8: the base's block "
                        "FP8 kept for every weight it stores in FP8 (merged ones requantized)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                        help="cast every float tensor (auto: as stored, quantized weights to bfloat16)")
    parser.add_argument("--expert-path", help="directory holding the routed experts' tensors, if not --model")
    parser.add_argument("--tokenizer", help="directory whose tokenizer files replace the base's")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export_checkpoint(args.model, args.adapter, args.out, shard_size=args.shard_size, format=args.format,
                          dtype=None if args.dtype == "auto" else getattr(torch, args.dtype),
                          expert_path=args.expert_path, tokenizer=args.tokenizer, progress=not args.quiet)
    except (ValueError, OSError, KeyError) as err:
        print(f"kt-sft export: error: {err}", file=sys.stderr)
        return 1
    return 0

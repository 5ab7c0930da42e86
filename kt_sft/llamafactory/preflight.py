"""The checks of a LLaMA-Factory run that need no weight, run from the hook's argument parsing (`config.resolve` ->
`check_run`): before LLaMA-Factory tokenizes the dataset and before any weight or checkpoint is read. Each error
(`KTConfigError`) names the key, path or variable and what to do; LLaMA-Factory would otherwise meet most of these
after the model has loaded (or after training, at the first save), with an error that names neither.

- engine threads against the CPUs this process may run on (more are clamped, with a warning: `threads_for_cpus`);
- kt_gpu_experts asked for without a CUDA device (a warning: nothing to share with);
- the checkpoint's shards: the index consistent, every header readable and covering its file (`scan`);
- adapters: at most one, complete and fitting the model built on meta (`kt_sft.models.adapter_check`);
- training: output_dir writable; lora_target naming modules of the model (else how its experts and linears are
  named); the checkpoint a resume would read complete. A save cut short (killed, disk full) leaves a checkpoint-N
  without trainer_state.json, which the Trainer writes last, or with a truncated file; LLaMA-Factory's automatic
  resume picks the newest checkpoint-N whatever its state, so here incomplete ones are skipped, named in a warning,
  in favour of the newest complete one, and a resume_from_checkpoint given explicitly must be complete.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import zipfile
from pathlib import Path

from ..checkpoint_files import TRUNCATED_ADVICE, open_safetensors, scan
from ..engine.runtime import threads_for_cpus
from ..models.adapter_check import check_adapter, expert_dims
from ..models.expert_lora import check_lora_targets
from .config import KTConfigError

logger = logging.getLogger("kt_sft")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def check_run(model_args, settings, keys: dict, model, finetuning_args=None, training_args=None) -> None:
    """Every check that applies to this run (model: the checkpoint's model built on meta); may lower
    settings.threads and set training_args.resume_from_checkpoint (see the module's doc)."""
    _check_threads(settings, keys)
    _check_gpu_experts(settings, keys)
    _wrapped(scan, Path(model_args.model_name_or_path), settings.expert_path,
             prefix="model_name_or_path: ")
    adapters = list(getattr(model_args, "adapter_name_or_path", None) or [])
    if len(adapters) > 1:
        raise KTConfigError(
            f"adapter_name_or_path lists {len(adapters)} adapters ({', '.join(adapters)}); with use_kt LLaMA-Factory "
            "takes one (it would merge the others into the base model, whose routed experts are packed in the CPU "
            f"engine): give one (e.g. {adapters[-1]}), or merge the others into the base checkpoint first "
            "(llamafactory-cli export without use_kt)")
    for adapter in adapters:
        _wrapped(check_adapter, adapter, model, model_args.model_name_or_path)
    if training_args is None or not getattr(training_args, "do_train", False):
        return
    _check_output_dir(training_args.output_dir)
    _check_resume(training_args)
    if finetuning_args is not None and (not adapters or getattr(finetuning_args, "create_new_adapter", False)):
        experts = [name for name, module in model.named_modules() if expert_dims(module)]
        _wrapped(check_lora_targets, model, finetuning_args.lora_target, experts,
                 getattr(finetuning_args, "lora_dropout", 0.0))


def _wrapped(check, *args, prefix: str = "") -> None:
    """Run a check whose errors (OSError, ValueError) are already worded for the user, as KTConfigErrors."""
    try:
        check(*args)
    except (OSError, ValueError) as err:
        raise KTConfigError(f"{prefix}{err}") from None


def _check_threads(settings, keys: dict) -> None:
    """kt_num_threads (cpu_infer) or KT_SFT_THREADS above the CPUs of this process: clamped, with the warning."""
    if settings.threads:
        name = next((n for n in ("kt_num_threads", "cpu_infer") if keys.get(n) not in (None, "")), "kt_num_threads")
        settings.threads = threads_for_cpus(settings.threads, name)
        return
    env = os.environ.get("KT_SFT_THREADS", "").strip()
    if env and int(env):  # the engine parsed it at import: an integer from 0 to 4096
        clamped = threads_for_cpus(int(env), "KT_SFT_THREADS")
        if clamped != int(env):
            settings.threads = clamped


def _check_gpu_experts(settings, keys: dict) -> None:
    import torch

    if keys.get("kt_gpu_experts") not in (None, "") and settings.gpu_experts not in ("auto", 0.0) \
            and not torch.cuda.is_available():
        logger.warning("kt-sft: kt_gpu_experts=%s has no effect here: there is no CUDA device, so every routed "
                       "expert runs on the CPU engine", keys["kt_gpu_experts"])


def _check_output_dir(output_dir: str) -> None:
    """output_dir, or the nearest directory above it that exists, takes a new file: the Trainer first writes
    there after the model has loaded and trained until its first save."""
    existing = Path(output_dir).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise KTConfigError(f"output_dir={output_dir!r}: {existing} is a file, not a directory; choose another "
                            "output_dir")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise KTConfigError(f"output_dir={output_dir!r} is not writable ({existing}: {err.strerror}); choose a "
                            "directory this user can write, or change its permissions") from None


def incomplete(checkpoint: Path) -> list[str]:
    """Why a Trainer checkpoint-N directory cannot be resumed from (empty: it is complete): no trainer_state.json
    (transformers' Trainer._save_checkpoint writes it last), or a file that fails its format's own completeness
    check (JSON; a safetensors header covering the file; torch.save's zip directory, at the file's end)."""
    problems = [] if (checkpoint / "trainer_state.json").is_file() else \
        ["no trainer_state.json (the Trainer writes it last)"]
    for file in sorted(p for p in checkpoint.iterdir() if p.is_file()):
        if file.suffix == ".json":
            try:
                json.loads(file.read_text())
            except ValueError:
                problems.append(f"{file.name} is not complete JSON")
        elif file.suffix == ".safetensors":
            try:
                with open_safetensors(file, "", ""):
                    pass
            except ValueError:
                problems.append(f"{file.name} is truncated or corrupt")
        elif file.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(file):
            problems.append(f"{file.name} is truncated (no torch.save zip directory)")
    return problems


def _checkpoints(folder: Path) -> list[Path]:
    """The checkpoint-N directories of `folder`, newest (largest N) first."""
    found = [p for p in folder.iterdir() if _CHECKPOINT.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name)[1]), reverse=True)


def _check_resume(training_args) -> None:
    given = training_args.resume_from_checkpoint
    if isinstance(given, str) and os.path.isdir(given):
        problems = incomplete(Path(given))
        if problems:
            complete = next((c for c in _checkpoints(Path(given).parent) if not incomplete(c)), None)
            instead = f"resume from {complete} (the newest complete one)" if complete else "start over"
            raise KTConfigError(f"resume_from_checkpoint={given!r} is incomplete: {'; '.join(problems)}: "
                                f"{TRUNCATED_ADVICE}; {instead}, and delete it")
        return
    out = Path(training_args.output_dir)
    if given or not out.is_dir() or getattr(training_args, "overwrite_output_dir", False):
        return
    partial, resume = [], None
    for checkpoint in _checkpoints(out):  # what LLaMA-Factory's automatic resume picks from, newest first
        problems = incomplete(checkpoint)
        if not problems:
            resume = checkpoint
            break
        partial.append(f"{checkpoint.name} ({'; '.join(problems)})")
    if not partial:
        return
    if resume is None:
        raise KTConfigError(f"output_dir {out} holds only incomplete checkpoints: {', '.join(partial)}; "
                            f"{TRUNCATED_ADVICE}. LLaMA-Factory would resume from the newest; delete them to start "
                            "over (or set overwrite_output_dir: true)")
    logger.warning("kt-sft: skipping incomplete checkpoint(s) in %s: %s (%s); resuming from %s, the newest complete "
                   "one. Delete the incomplete ones (training overwrites them when it gets there)",
                   out, ", ".join(partial), TRUNCATED_ADVICE, resume.name)
    training_args.resume_from_checkpoint = str(resume)

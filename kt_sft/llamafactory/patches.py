"""What the hook changes in stock LLaMA-Factory 0.9.5, one function per module (applied by `startup`).

Everything else (data pipeline, templates, Trainer, PEFT set-up, logging, plot_loss, progress bars) stays
LLaMA-Factory's own code. The changes:

- `llamafactory.hparams.parser`:
  * `check_version`: `use_kt` makes LLaMA-Factory demand the packages kt-kernel / transformers-kt /
    accelerate-kt; kt-sft provides that contract (checked: its engine imports), other requirements pass through.
  * `_parse_args`: takes our `kt_*` keys out of the arguments before LLaMA-Factory's strict parser sees them,
    then validates them with the parsed dataclasses (`config.resolve`) and attaches the resolved settings to
    the ModelArguments as `kt_sft_settings`. Bad combinations fail here, and so do the checks of files and machine
    (`preflight.py`: shards, adapters, output_dir, lora_target, resume): before LLaMA-Factory tokenizes the dataset
    and before any weight is read.
- `llamafactory.train.sft.workflow`: lets `predict_with_generate` / `compute_accuracy` run (see
  `patch_sft_workflow`).
- `llamafactory.train.dpo.workflow`, `llamafactory.train.kto.workflow`: a `ref_model` naming the base checkpoint
  is the policy with its adapter disabled, not a second load (see `patch_preference_workflow`).
- `llamafactory.model.adapter`: PEFT set-up on an engine model goes through kt_sft.models.expert_lora
  (`lora_target` may name the routed experts, also of vision-language models, whose targets LLaMA-Factory turns
  into full module names first; see `patch_adapter`).
- `llamafactory.train.tuner`: `export_model` with `use_kt` merges the adapters into the base checkpoint streamed
  shard by shard (kt_sft/llamafactory/exporting.py; stock export would build the whole model and refuses a use_kt
  one); without `use_kt` it is stock.
- `llamafactory.chat.hf_engine`: the daemon thread that streams `generate` is stopped and joined when the
  interpreter exits (see `patch_hf_engine`).
- `accelerate.accelerator` (FSDP2, as LLaMA-Factory's accelerate FSDP configs run it): for a model with engine
  experts, `fsdp2_prepare_model` leaves the expert-LoRA factors out of FSDP and keeps the frozen weights' dtype,
  the optimizer keeps the factors in param groups of their own, and the gradient clip takes one norm over FSDP's
  sharded gradients and theirs (see `patch_accelerator`); other models take accelerate's own paths.
- `transformers.trainer`: resuming such a model from a FULL_STATE_DICT FSDP2 checkpoint reloads the LoRA from the
  checkpoint's adapter file after accelerate's load (see `patch_trainer`).
- Without USE_KT=1 the `.pth` installs only `patch_parser_hint` (in llamafactory-cli processes): a config
  written for kt-sft then fails with "set USE_KT=1" instead of stock's advice to install kt-kernel.
- `llamafactory.model.loader`:
  * `load_model` marks the load as a kt-sft one (a context variable) when `use_kt` is on, and
  * the auto classes it picks from (`AutoModelForCausalLM`, and `AutoModelForImageTextToText` /
    `AutoModelForSeq2SeqLM` / `AutoModelForTextToWaveform`, which it tries first: mistral4's text model is reached
    through the image-text one), as that module sees them, build the model with `kt_sft.loader.load_model` while
    the mark is set (LLaMA-Factory's patch_config / patch_model / init_adapter run around it unchanged); the loader
    refuses a model kind it cannot offload (omni) by name.
"""
from __future__ import annotations

import atexit
import contextvars
import functools
import re
import threading
import weakref
from typing import Any, Callable

_KT_REQUIREMENTS = ("kt-kernel", "transformers-kt", "accelerate-kt")
_active_load: contextvars.ContextVar = contextvars.ContextVar("kt_sft_active_load", default=None)


def _require_engine(requirement: str) -> None:
    try:
        from .. import engine  # noqa: F401  (imports kt_sft._engine, the compiled module)
    except ImportError as err:
        raise ImportError(f"use_kt needs {requirement}, which kt-sft provides, but kt-sft's engine does not import "
                          f"({err}); rebuild it with `pip install -e .` (or `make build`)") from err


def patch_parser(parser_module) -> None:
    from . import config

    original_check = parser_module.check_version
    original_parse = parser_module._parse_args
    if getattr(original_parse, "_kt_sft", False):
        return

    @functools.wraps(original_check)
    def check_version(requirement: str, mandatory: bool = False) -> None:
        if requirement.split("=")[0].split("<")[0].split(">")[0].strip() in _KT_REQUIREMENTS:
            return _require_engine(requirement)
        return original_check(requirement, mandatory)

    @functools.wraps(original_parse)
    def _parse_args(parser, args=None, allow_extra_keys: bool = False):
        rest, ours = config.split_kt_keys(parser_module.read_args(args))
        parsed = original_parse(parser, rest, allow_extra_keys)
        by_name = {type(obj).__name__: obj for obj in parsed}
        model_args = by_name.get("ModelArguments")
        if model_args is not None:
            model_args.kt_sft_settings = config.resolve(
                ours, model_args, by_name.get("FinetuningArguments"), by_name.get("TrainingArguments"))
        return parsed

    _parse_args._kt_sft = True
    parser_module.check_version = check_version
    parser_module._parse_args = _parse_args


USE_KT_HINT = ("{what}, but kt-sft's LLaMA-Factory hook is off: set USE_KT=1 in the environment (USE_KT=1 "
               "llamafactory-cli train cfg.yaml) with use_kt: true in the config. kt-sft provides what use_kt asks for "
               "(kt-kernel, transformers-kt, accelerate-kt): do not pip install them")
KT_SFT_KEYS = ("kt_", "cpu_infer", "chunk_size")  # prefixes of the keys only kt-sft reads (config.KEY_SPECS)


def _given_keys(args) -> list[str]:
    """The keys of LLaMA-Factory's raw arguments (a dict from YAML, or an argv list)."""
    if isinstance(args, dict):
        return list(args)
    return [str(a)[2:].split("=", 1)[0] for a in args or [] if str(a).startswith("--")]


def patch_parser_hint(parser_module) -> None:
    """Without USE_KT=1 (the hook off, in a llamafactory-cli process): parsing stays stock, but where stock fails
    on a config written for kt-sft (use_kt: true -> "kt-kernel not found, run pip install kt-kernel"; a kt-sft key
    -> "keys not used: kt_backend"), the error says to set USE_KT=1 instead. Imports nothing of kt-sft's engine."""
    original_check = parser_module.check_version
    original_parse = parser_module._parse_args
    if getattr(original_parse, "_kt_sft_hint", False):
        return

    @functools.wraps(original_check)
    def check_version(requirement: str, mandatory: bool = False) -> None:
        try:
            return original_check(requirement, mandatory)
        except Exception as err:  # transformers' require_version: PackageNotFoundError / ImportError
            if requirement.split("=")[0].split("<")[0].split(">")[0].strip() not in _KT_REQUIREMENTS:
                raise
            raise ImportError(USE_KT_HINT.format(what=f"use_kt: true needs {requirement}")) from err

    @functools.wraps(original_parse)
    def _parse_args(parser, args=None, allow_extra_keys: bool = False):
        try:
            return original_parse(parser, args, allow_extra_keys)
        except ValueError as err:
            ours = [k for k in _given_keys(parser_module.read_args(args)) if k.startswith(KT_SFT_KEYS) and k in str(err)]
            if not ours:
                raise
            raise ValueError(USE_KT_HINT.format(what=f"{', '.join(ours)} given (kt-sft keys)")) from err

    _parse_args._kt_sft_hint = True
    parser_module.check_version = check_version
    parser_module._parse_args = _parse_args


def _settings_for(model_args):
    from .config import resolve

    settings = getattr(model_args, "kt_sft_settings", None)
    return settings if settings is not None else resolve({}, model_args)


class _KtAutoClass:
    """Stands in for a transformers auto class (AutoModelForCausalLM, ...) inside llamafactory.model.loader only."""

    def __init__(self, auto_class) -> None:
        self._auto = auto_class

    def __getattr__(self, name: str) -> Any:  # _model_mapping, from_config, ... as the real class has them
        return getattr(self._auto, name)

    def from_pretrained(self, pretrained_model_name_or_path=None, *args, **kwargs):
        active = _active_load.get()
        if active is None:
            return self._auto.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        from .loading import load_for_llamafactory

        return load_for_llamafactory(pretrained_model_name_or_path, kwargs, *active)


def patch_loader(loader_module) -> None:
    original_load = loader_module.load_model
    if getattr(original_load, "_kt_sft", False):
        return

    @functools.wraps(original_load)
    def load_model(tokenizer, model_args, finetuning_args, is_trainable: bool = False, add_valuehead: bool = False):
        if not getattr(model_args, "use_kt", False):
            return original_load(tokenizer, model_args, finetuning_args, is_trainable, add_valuehead)
        token = _active_load.set((model_args, _settings_for(model_args), is_trainable))
        try:
            return original_load(tokenizer, model_args, finetuning_args, is_trainable, add_valuehead)
        finally:
            _active_load.reset(token)

    load_model._kt_sft = True
    loader_module.load_model = load_model
    from ..models.derive import AUTO_CLASSES

    for name in AUTO_CLASSES:
        setattr(loader_module, name, _KtAutoClass(getattr(loader_module, name)))


def patch_sft_workflow(workflow_module) -> None:
    """LLaMA-Factory 0.9.5's run_sft refuses predict_with_generate / compute_accuracy under use_kt (kt-kernel's
    backend cannot generate). Ours runs stock `generate` and evaluation, so run_sft's own load_model call (the
    only place in run_sft that needs use_kt) loads through kt-sft and then clears use_kt on these arguments for
    the rest of run_sft; the model already is what it is, and `kt_sft_loaded` records how it was built."""
    original_load = workflow_module.load_model
    if getattr(original_load, "_kt_sft_workflow", False):
        return

    @functools.wraps(original_load)
    def load_model(tokenizer, model_args, finetuning_args, is_trainable: bool = False, add_valuehead: bool = False):
        model = original_load(tokenizer, model_args, finetuning_args, is_trainable, add_valuehead)
        if getattr(model_args, "use_kt", False):
            model_args.kt_sft_loaded, model_args.use_kt = True, False
        return model

    load_model._kt_sft_workflow = True
    workflow_module.load_model = load_model


def patch_preference_workflow(workflow_module) -> None:
    """DPO / KTO (LLaMA-Factory's run_dpo / run_kto). Their reference forward is LLaMA-Factory's own: with LoRA and
    no ref_model the trainer runs the policy under `disable_adapter()` and no_grad (PEFT's context switches off the
    engine's expert LoRA terms too, and such a forward saves nothing in the engine: kt_sft.models.experts). A
    `ref_model` reaches `create_ref_model` only when config._check_reference accepted it, i.e. when it is the base
    checkpoint itself: that model is the policy with its adapter disabled, so no second model (and no second copy
    of the experts) is loaded; the trainer then takes the disable_adapter path."""
    original_create = workflow_module.create_ref_model
    if getattr(original_create, "_kt_sft", False):
        return

    @functools.wraps(original_create)
    def create_ref_model(model_args, finetuning_args, add_valuehead: bool = False):
        if getattr(model_args, "use_kt", False):
            return None
        return original_create(model_args, finetuning_args, add_valuehead)

    create_ref_model._kt_sft = True
    workflow_module.create_ref_model = create_ref_model


def _expand_all(model, names: list[str], freeze_vision_tower: bool = True) -> list[str]:
    """`all` next to other names: LLaMA-Factory's "every linear" list (what it means when it stands alone)."""
    from llamafactory.model.model_utils.misc import find_all_linear_modules

    if "all" not in names:
        return names
    return [n for n in names if n != "all"] + find_all_linear_modules(model, freeze_vision_tower=freeze_vision_tower)


def split_lora_targets(model, target_modules) -> tuple[list[str], list[str]]:
    """LLaMA-Factory's lora_target list -> (target_modules, expert target_parameters) for an engine model.

    Names keep stock PEFT's meaning wherever they match modules (so `lora_target: all`, which LLaMA-Factory
    expands to every linear including dense and shared-expert `down_proj`s, targets exactly what it targets
    without kt-sft); `experts`, `mlp.experts`, and `gate_up_proj` / `down_proj` / `mlp.experts.<param>` where no
    module has that name, name the routed experts (expert_lora.names_routed_experts). `all` next to other names
    expands to LLaMA-Factory's "every linear" list (what it means when it stands alone)."""
    from ..models.expert_lora import names_routed_experts

    names = [target_modules] if isinstance(target_modules, str) else list(target_modules or [])
    experts = [n for n in names if n != "all" and names_routed_experts(model, n)]
    modules = _expand_all(model, [n for n in names if n not in experts])
    return sorted(set(modules)), experts


def patch_adapter(adapter_module) -> None:
    """LLaMA-Factory's init_adapter (use_kt branch) calls `get_peft_model` and `PeftModel.from_pretrained` by the
    names it imported; on an engine model they go through kt_sft.models.expert_lora, so `lora_target` may name the
    routed experts and adapters with expert LoRA load onto the engine."""
    from ..models import expert_lora

    original_get = adapter_module.get_peft_model
    if getattr(original_get, "_kt_sft", False):
        return

    @functools.wraps(original_get)
    def get_peft_model(model, peft_config, *args, **kwargs):
        if not expert_lora.engine_experts_modules(model):
            return original_get(model, peft_config, *args, **kwargs)
        modules, experts = split_lora_targets(model, peft_config.target_modules)
        if experts and getattr(peft_config, "lora_dropout", 0):
            raise ValueError(f"lora_dropout={peft_config.lora_dropout}: LoRA on the routed experts (lora_target "
                             f"{', '.join(experts)}) needs lora_dropout: 0 (PEFT applies no dropout to "
                             "target_parameters); set lora_dropout: 0 or leave the routed experts out of lora_target")
        if experts:
            peft_config.target_modules = modules
            peft_config.target_parameters = list(getattr(peft_config, "target_parameters", None) or []) + experts
        return expert_lora.get_peft_model(model, peft_config, *args, **kwargs)

    class PeftModel(adapter_module.PeftModel):
        @classmethod
        def from_pretrained(cls, model, model_id, *args, **kwargs):
            if expert_lora.engine_experts_modules(model):
                return expert_lora.load_adapter(model, model_id, *args, **kwargs)
            return super().from_pretrained(model, model_id, *args, **kwargs)

    get_peft_model._kt_sft = True
    adapter_module.get_peft_model = get_peft_model
    adapter_module.PeftModel = PeftModel
    _patch_target_modules(adapter_module)


def _patch_target_modules(adapter_module) -> None:
    from ..models import expert_lora

    original_patch_targets = adapter_module.patch_target_modules

    @functools.wraps(original_patch_targets)
    def patch_target_modules(model, finetuning_args, target_modules):
        """For vision-language models LLaMA-Factory turns each lora_target into the full names of the modules whose
        name contains it, outside the frozen vision tower; names of the routed experts skip that (they become
        target_parameters in get_peft_model, not their modules' children such as `act_fn`) and `all` next to them
        expands first, as for text models."""
        if not expert_lora.engine_experts_modules(model) or isinstance(target_modules, str):
            return original_patch_targets(model, finetuning_args, target_modules)
        experts = [n for n in target_modules if n != "all" and expert_lora.names_routed_experts(model, n)]
        modules = [n for n in target_modules if n not in experts]
        if experts:
            modules = _expand_all(model, modules, finetuning_args.freeze_vision_tower)
        return list(original_patch_targets(model, finetuning_args, modules)) + experts

    adapter_module.patch_target_modules = patch_target_modules


def patch_tuner(tuner_module) -> None:
    """`llamafactory-cli export` (the launcher imports tuner.export_model when it runs): use_kt arguments go to
    kt-sft's streaming export, any others to stock export_model."""
    original_export = tuner_module.export_model
    if getattr(original_export, "_kt_sft", False):
        return

    @functools.wraps(original_export)
    def export_model(args=None) -> None:
        from llamafactory.hparams import get_infer_args

        model_args, data_args, _, _ = get_infer_args(args)
        if not getattr(model_args, "use_kt", False):
            return original_export(args)
        from .exporting import export_for_llamafactory

        export_for_llamafactory(model_args, data_args)

    export_model._kt_sft = True
    tuner_module.export_model = export_model


_exiting = threading.Event()
_generate_threads: weakref.WeakSet = weakref.WeakSet()


def _stop_generation_at_exit() -> None:
    """atexit: ask running generations to stop at their next token, then wait for their threads to end."""
    _exiting.set()
    for thread in list(_generate_threads):
        thread.join(timeout=120)


def patch_hf_engine(engine_module) -> None:
    """LLaMA-Factory's HuggingfaceEngine streams from `model.generate` running in a daemon thread. If the
    interpreter exits (chat's `exit`, an API server shutting down, Ctrl-C) while that thread still generates or
    is tearing down its frames, Python 3.11 ends the thread inside torch's tensor deallocator and the process
    aborts with "terminate called without an active exception" (stock LLaMA-Factory too: about 1 chat session in
    20 on a 2-core CPU). Here the thread gets one more stopping criterion, true once the interpreter starts
    exiting, and an atexit handler joins it before finalization, so exits are clean and take at most one token."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    if getattr(engine_module.Thread, "_kt_sft", False):
        return

    class StopAtExit(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), _exiting.is_set(), dtype=torch.bool, device=input_ids.device)

    class GenerateThread(engine_module.Thread):
        _kt_sft = True

        def __init__(self, *args, kwargs=None, **thread_kwargs):
            kwargs = dict(kwargs or {})
            kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []),
                                                                StopAtExit()])
            super().__init__(*args, kwargs=kwargs, **thread_kwargs)

        def start(self):
            _generate_threads.add(self)
            super().start()

    engine_module.Thread = GenerateThread
    atexit.register(_stop_generation_at_exit)


def _leave_engine_out(plugin, model) -> bool:
    """Before accelerate's FSDP2 shards a kt-sft model: the expert-LoRA factors join the plugin's ignored modules
    (fp32 CPU tensors the engine reads; kt_sft.distributed averages their gradients), and the plugin's
    cpu_ram_efficient_loading is off: it would move the model to meta and refill it from rank 0's state dict,
    which has no place for parameters FSDP ignores, while kt-sft's loader already put the dense weights in host
    RAM on every rank (and the routed experts once per host); the trainable parameters are rank 0's instead
    (kt_sft.distributed.before_sharding), as that refill would have made them. False: not a kt-sft model."""
    from .. import distributed
    from ..models import expert_lora
    from .loading import _logger

    if not expert_lora.engine_experts_modules(model):
        return False
    note = ""
    if plugin.cpu_ram_efficient_loading:
        plugin.cpu_ram_efficient_loading = False
        note = "; fsdp_cpu_ram_efficient_loading unused (kt-sft loaded the dense weights on every rank)"
    factors = expert_lora.expert_lora_parameters(model)
    given = plugin.ignored_modules
    if isinstance(given, str):  # accelerate's regex over module names (fully matched)
        given = [m for name, m in model.named_modules() if re.fullmatch(given, name)]
    plugin.ignored_modules = list(given or []) + distributed.fsdp_ignored_modules(model, factors)
    distributed.before_sharding(model, factors)
    _logger().info_rank0(f"kt-sft: FSDP2 shards the dense part; {len(factors)} expert-LoRA factors stay out of it "
                         f"(averaged by kt-sft){note}")
    return True


def patch_accelerator(accelerator_module) -> None:
    """FSDP2 of a kt-sft model through accelerate (how LLaMA-Factory's FSDP configs run): accelerate's
    `fsdp2_prepare_model`, as the Accelerator calls it, leaves the engine's side out first (`_leave_engine_out`)
    and keeps the frozen weights in their dtype (kt_sft.distributed.frozen_dtype_kept), the optimizer then keeps
    the factors in param groups of their own (kt_sft.distributed.split_param_groups), and
    `Accelerator.clip_grad_norm_` clips FSDP's sharded gradients together with the expert-LoRA factors'
    plain ones (kt_sft.distributed.clip_grad_norm; torch's clip_grad_norm_ refuses to mix them). Models without
    such plain gradients, and every other distributed type, take accelerate's own paths."""
    from .. import distributed

    original_prepare = accelerator_module.fsdp2_prepare_model
    if getattr(original_prepare, "_kt_sft", False):
        return

    @functools.wraps(original_prepare)
    def fsdp2_prepare_model(accelerator, model):
        if not _leave_engine_out(accelerator.state.fsdp_plugin, model):
            return original_prepare(accelerator, model)
        with distributed.frozen_dtype_kept(model):
            return original_prepare(accelerator, model)

    original_clip = accelerator_module.Accelerator.clip_grad_norm_

    @functools.wraps(original_clip)
    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        from torch.distributed.tensor import DTensor

        parameters = list(parameters)
        kinds = {isinstance(p, DTensor) for p in parameters if p.grad is not None}
        if self.is_fsdp2 and len(kinds) == 2:
            self.unscale_gradients()
            return distributed.clip_grad_norm(parameters, max_norm, norm_type)
        return original_clip(self, parameters, max_norm, norm_type)

    original_switch = accelerator_module.fsdp2_switch_optimizer_parameters

    @functools.wraps(original_switch)
    def fsdp2_switch_optimizer_parameters(optimizer, mapping):
        original_switch(optimizer, mapping)
        distributed.split_param_groups(optimizer)  # before any state or schedule exists

    fsdp2_prepare_model._kt_sft = True
    accelerator_module.fsdp2_prepare_model = fsdp2_prepare_model
    accelerator_module.fsdp2_switch_optimizer_parameters = fsdp2_switch_optimizer_parameters
    accelerator_module.Accelerator.clip_grad_norm_ = clip_grad_norm_


def patch_trainer(trainer_module) -> None:
    """transformers' Trainer resuming a kt-sft model under FSDP2 with FULL_STATE_DICT: after accelerate's
    `load_fsdp_model`, the LoRA comes from the checkpoint's adapter file (kt_sft.distributed.
    reload_adapter_after_fsdp_load: accelerate's FSDP2 checkpoint holds rank 0's shards of it only)."""
    from .. import distributed
    from ..models import expert_lora

    original_load = trainer_module.load_fsdp_model
    if getattr(original_load, "_kt_sft", False):
        return

    @functools.wraps(original_load)
    def load_fsdp_model(fsdp_plugin, accelerator, model, input_dir, *args, **kwargs):
        result = original_load(fsdp_plugin, accelerator, model, input_dir, *args, **kwargs)
        if accelerator.is_fsdp2 and "FULL_STATE_DICT" in str(fsdp_plugin.state_dict_type) \
                and expert_lora.engine_experts_modules(model):
            distributed.reload_adapter_after_fsdp_load(model, input_dir)
        return result

    load_fsdp_model._kt_sft = True
    trainer_module.load_fsdp_model = load_fsdp_model


HINT_PATCHES: dict[str, Callable] = {"llamafactory.hparams.parser": patch_parser_hint}  # USE_KT unset
PATCHES: dict[str, Callable] = {
    "accelerate.accelerator": patch_accelerator,
    "transformers.trainer": patch_trainer,
    "llamafactory.chat.hf_engine": patch_hf_engine,
    "llamafactory.hparams.parser": patch_parser,
    "llamafactory.model.loader": patch_loader,
    "llamafactory.train.sft.workflow": patch_sft_workflow,
    "llamafactory.train.dpo.workflow": patch_preference_workflow,
    "llamafactory.train.kto.workflow": patch_preference_workflow,
    "llamafactory.model.adapter": patch_adapter,
    "llamafactory.train.tuner": patch_tuner,
}

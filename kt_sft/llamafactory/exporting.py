"""`USE_KT=1 llamafactory-cli export cfg.yaml` with `use_kt: true`: the adapters merged into the base checkpoint by
kt_sft.export, streamed shard by shard, instead of LLaMA-Factory's export (which builds the whole model and, for a
use_kt model, refuses: "The model is not a `PreTrainedModel`").

LLaMA-Factory's keys keep their meaning: model_name_or_path, adapter_name_or_path (one or several, merged in order),
export_dir, export_size (GB per shard), infer_dtype (auto: tensors as stored, quantized ones in bf16; else every
float tensor in that dtype); export_device does not matter (no GPU is used). The tokenizer (and processor) are
LLaMA-Factory's own, with the template's fixes, saved with padding_side left, plus the Ollama Modelfile, as stock
export writes them. kt-sft's keys: kt_export_format (bf16 | fp8), kt_expert_checkpoint_path, kt_optimize_rule.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import KTConfigError


def _refuse_unsupported(model_args) -> None:
    """LLaMA-Factory export options the streaming export does not honour, refused before anything is read."""
    if model_args.export_dir is None:
        raise KTConfigError("Please specify `export_dir` to save model.")
    if not model_args.adapter_name_or_path:
        raise KTConfigError("export with use_kt merges adapter_name_or_path into model_name_or_path; give the "
                            "adapter (the output_dir or a checkpoint-N of a LoRA run). Without an adapter the base "
                            "checkpoint already is the standalone model")
    refused = {
        "export_quantization_bit": "GPTQ export quantization; kt_export_format: fp8 keeps an FP8 base's block FP8",
        "export_legacy_format": ".bin output; the export writes safetensors",
        "export_hub_model_id": "upload the export_dir afterwards (huggingface-cli upload REPO EXPORT_DIR)",
    }
    for key, advice in refused.items():
        if getattr(model_args, key, None):
            raise KTConfigError(f"{key} with use_kt is not supported by kt-sft's streaming export: {advice}")


def _tokenizer_writer(model_args, data_args):
    """Loads LLaMA-Factory's tokenizer / processor and template now (their errors come before the export starts);
    returns what writes them, and the Ollama Modelfile, into the output directory, as stock export does."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.extras import logging as lf_logging
    from llamafactory.model import load_tokenizer

    module = load_tokenizer(model_args)
    tokenizer, processor = module["tokenizer"], module["processor"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    logger = lf_logging.get_logger("llamafactory.kt_sft")

    def write(directory: Path) -> None:
        try:
            tokenizer.padding_side = "left"
            tokenizer.init_kwargs["padding_side"] = "left"
            tokenizer.save_pretrained(directory)
            if processor is not None:
                processor.save_pretrained(directory)
        except Exception as err:  # stock export only warns here too
            logger.warning_rank0(f"Cannot save tokenizer, please copy the files manually: {err}.")
        (directory / "Modelfile").write_text(template.get_ollama_modelfile(tokenizer), encoding="utf-8")

    return write


def export_for_llamafactory(model_args, data_args) -> None:
    """LLaMA-Factory's export_model for use_kt arguments (parsed by its get_infer_args, checked by the hook)."""
    from ..export import export_checkpoint
    from .config import resolve

    _refuse_unsupported(model_args)
    settings = getattr(model_args, "kt_sft_settings", None) or resolve({}, model_args)
    write_tokenizer = _tokenizer_writer(model_args, data_args)
    dtype = None if model_args.infer_dtype == "auto" else getattr(torch, model_args.infer_dtype)
    plan = export_checkpoint(model_args.model_name_or_path, list(model_args.adapter_name_or_path),
                             os.fspath(model_args.export_dir), shard_size=f"{model_args.export_size}GB",
                             format=settings.export_format, dtype=dtype, expert_path=settings.expert_path,
                             rule=settings.rule, family=settings.family, finish=write_tokenizer)
    from llamafactory.extras import logging as lf_logging

    lf_logging.get_logger("llamafactory.kt_sft").info_rank0(plan.summary())

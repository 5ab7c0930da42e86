"""Test shims for the 2-rank CLI runs of tests/test_ddp.py (on PYTHONPATH only there, both sides):

- With KT_TEST_TARGET_PARAMETERS set (comma-separated PEFT target_parameters), `peft.get_peft_model` adds them to
  every LoraConfig it gets, so stock LLaMA-Factory (whose lora_target fills target_modules only) trains PEFT LoRA on
  the routed experts of the stock transformers model: the reference for kt-sft's `lora_target: all,experts`.
- CPU-only multi-process runs: the Trainer resumes the optimizer with `torch.load(map_location=args.device)`, which
  is `cpu:0` there, a location torch cannot restore ("don't know how to restore data location ... cpu:0"; stock
  LLaMA-Factory fails the same way). Locations `cpu:N` restore to the CPU. (On GPUs the device is `cuda:N`.)
- FSDP on CPU (ACCELERATE_USE_FSDP=true, as `accelerate launch` with an FSDP config sets it): accelerate's state
  makes a CPU process group MULTI_CPU and drops the FSDP plugin there (its FSDP branch lists GPU kinds only), so
  the run would silently be data parallel. Torch's FSDP2 (`fully_shard`) itself runs on a CPU mesh over gloo;
  here the state keeps the plugin and says FSDP on CPU, and everything after it (accelerate's fsdp2_prepare_model,
  the Trainer's FSDP paths) is stock.
"""
import os
import re

import torch.serialization


def _cpu_index(obj):
    return None


def _restore_cpu_n(obj, location):
    return obj if re.fullmatch(r"cpu:\d+", str(location)) else None


# After torch's own backends (priorities 10-26 in torch 2.x; an equal priority makes the registry's sort compare
# functions and fail).
torch.serialization.register_package(100, _cpu_index, _restore_cpu_n)

if os.environ.get("KT_TEST_TARGET_PARAMETERS"):
    import functools

    import peft

    _original = peft.get_peft_model

    @functools.wraps(_original)
    def get_peft_model(model, config, *args, **kwargs):
        config.target_parameters = os.environ["KT_TEST_TARGET_PARAMETERS"].split(",")
        return _original(model, config, *args, **kwargs)

    peft.get_peft_model = get_peft_model

if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
    import functools

    from accelerate import state as _state

    _init = _state.AcceleratorState.__init__

    @functools.wraps(_init)
    def _fsdp_on_cpu(self, mixed_precision=None, cpu=False, *args, fsdp_plugin=None, **kwargs):
        _init(self, mixed_precision, cpu, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == _state.DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = _state.DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            _state.PartialState._shared_state["distributed_type"] = self.distributed_type  # as the original does

    _state.AcceleratorState.__init__ = _fsdp_on_cpu

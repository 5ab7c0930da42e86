"""Test shim for the stock side of expert-LoRA parity runs (tests/test_ddp.py): with KT_TEST_TARGET_PARAMETERS set
(comma-separated PEFT target_parameters), `peft.get_peft_model` adds them to every LoraConfig it gets, so stock
LLaMA-Factory (whose lora_target fills target_modules only) trains PEFT LoRA on the routed experts of the stock
transformers model, the reference for kt-sft's `lora_target: all,experts`. On PYTHONPATH only in those runs."""
import os

if os.environ.get("KT_TEST_TARGET_PARAMETERS"):
    import functools

    import peft

    _original = peft.get_peft_model

    @functools.wraps(_original)
    def get_peft_model(model, config, *args, **kwargs):
        config.target_parameters = os.environ["KT_TEST_TARGET_PARAMETERS"].split(",")
        return _original(model, config, *args, **kwargs)

    peft.get_peft_model = get_peft_model

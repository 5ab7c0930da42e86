"""Stock LLaMA-Factory's CLI (`python tests/stock_expert_lora.py train cfg.yaml`, USE_KT=0) with LoRA also on the
routed experts: PEFT `target_parameters` from KT_SFT_TEST_TARGET_PARAMETERS (comma-separated), added to the
LoraConfig LLaMA-Factory builds. The stock counterpart of `lora_target: ...,experts` under use_kt, which
LLaMA-Factory 0.9.5 has no key for; everything else is its own code."""
import os
import sys

import llamafactory.train.tuner  # noqa: F401  first, as the CLI's own imports go: importing the adapter module
# first leaves trl 0.24 believing mergekit is installed here, and its DPO trainer then fails to import
import llamafactory.model.adapter as adapter
from llamafactory.cli import main

_stock_get_peft_model = adapter.get_peft_model


def get_peft_model(model, peft_config, *args, **kwargs):
    peft_config.target_parameters = os.environ["KT_SFT_TEST_TARGET_PARAMETERS"].split(",")
    return _stock_get_peft_model(model, peft_config, *args, **kwargs)


if __name__ == "__main__":
    adapter.get_peft_model = get_peft_model
    sys.argv[0] = "llamafactory-cli"
    sys.exit(main())

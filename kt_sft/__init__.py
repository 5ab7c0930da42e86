"""kt-sft: LoRA fine-tuning of large Mixture-of-Experts models with the routed experts on a CPU engine.

Rooms: `kt_sft.loader` (`load_model`), `kt_sft.models` (MoE family rules, derived from the model), `kt_sft.engine` (Python wrapper + autograd glue over the C++ `kt_sft._engine`), `kt_sft.env`
(`python -m kt_sft env`).
"""
__version__ = "0.1.0"


def __getattr__(name):  # transformers is imported only when the loader is used
    if name == "load_model":
        from .loader import load_model

        return load_model
    raise AttributeError(name)

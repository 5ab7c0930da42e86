"""kt-sft: LoRA fine-tuning of large Mixture-of-Experts models with the routed experts on a CPU engine.

Rooms: `kt_sft.engine` (Python wrapper + autograd glue over the C++ `kt_sft._engine`), `kt_sft.env`
(`python -m kt_sft env`).
"""
__version__ = "0.1.0"

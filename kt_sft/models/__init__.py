"""Model registry (one YAML per MoE family) and the `kt` experts implementation for transformers."""
from .registry import MoEFamily, UnsupportedModelError, get_family, load_family_file, supported_model_types

__all__ = ["MoEFamily", "UnsupportedModelError", "get_family", "load_family_file", "supported_model_types"]

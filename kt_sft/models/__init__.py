"""Model registry (each MoE family's rule, derived from the model or read from a YAML override) and the `kt`
experts implementation for transformers."""
from .registry import MoEFamily, UnsupportedModelError, get_override, load_family_file

__all__ = ["MoEFamily", "UnsupportedModelError", "get_override", "load_family_file"]

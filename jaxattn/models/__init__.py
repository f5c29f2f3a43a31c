"""Flax NNX models built on jaxattn's ops."""

from jaxattn.models.registry import MODEL_CONFIGS, create_model
from jaxattn.models.tnl import TNL, TNLConfig, generate, tnl_slopes

__all__ = ["MODEL_CONFIGS", "TNL", "TNLConfig", "create_model", "generate", "tnl_slopes"]

"""Flax NNX models built on jaxattn's ops."""

from jaxattn.models.halonet import HaloAttn, HaloNet, HaloNetConfig, load_timm_state_dict, to_timm_state_dict
from jaxattn.models.gpt import GPT, GPTConfig
from jaxattn.models.registry import MODEL_CONFIGS, create_model
from jaxattn.models.tnl import TNL, TNLConfig, generate, tnl_slopes
from jaxattn.models.vit import ViT, ViTConfig

__all__ = [
    "HaloAttn", "HaloNet", "HaloNetConfig", "load_timm_state_dict", "to_timm_state_dict",
    "GPT", "GPTConfig", "MODEL_CONFIGS", "TNL", "TNLConfig", "create_model", "generate", "tnl_slopes", "ViT", "ViTConfig"]

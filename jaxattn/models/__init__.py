"""Flax NNX models built on jaxattn's ops."""

from jaxattn.models.eva import Eva, EvaConfig
from jaxattn.models.halonet import HaloAttn, HaloNet, HaloNetConfig, load_timm_state_dict, to_timm_state_dict
from jaxattn.models.gpt import GPT, GPTConfig
from jaxattn.models.landmark import LandmarkGPT, LandmarkGPTConfig
from jaxattn.models.lora import add_lora, merge_lora
from jaxattn.models.l2vit import L2ViT, L2ViTConfig
from jaxattn.models.moh import MoHAttention, MoHViT, MoHViTConfig
from jaxattn.models.probing import AttentiveProbe, EfficientProbe, LinearProbe
from jaxattn.models.registry import MODEL_CONFIGS, create_model
from jaxattn.models.sparsifiner import Sparsifiner, SparsifinerConfig
from jaxattn.models.generation import apply_repetition_penalty, generate, sample_logits, supports_generation
from jaxattn.models.tnl import TNL, TNLConfig, tnl_slopes
from jaxattn.models.vit import ViT, ViTConfig

__all__ = [
    "Eva", "EvaConfig", "HaloAttn", "HaloNet", "HaloNetConfig", "load_timm_state_dict", "to_timm_state_dict",
    "AttentiveProbe", "EfficientProbe", "LinearProbe",
    "MoHAttention", "MoHViT", "MoHViTConfig", "add_lora", "merge_lora",
    "GPT", "GPTConfig", "LandmarkGPT", "LandmarkGPTConfig", "L2ViT", "L2ViTConfig", "MODEL_CONFIGS", "Sparsifiner", "SparsifinerConfig", "TNL", "TNLConfig", "apply_repetition_penalty", "create_model", "generate", "sample_logits", "supports_generation", "tnl_slopes", "ViT", "ViTConfig"]

"""Pallas GPU kernels (Triton backend), importable as ``jaxattn.pallas``.

Every kernel runs in interpret mode on a CPU (``interpret=None`` picks that
automatically when no GPU is present), so the same tests run everywhere.
"""

from jaxattn.pallas._common import interpret_default, poison_outputs
from jaxattn.pallas.flash import FlashConfig, flash_attention, flash_config
from jaxattn.pallas.lightning import LightningConfig, lightning_attention_kernel, lightning_config

__all__ = [
    "FlashConfig",
    "LightningConfig",
    "flash_attention",
    "flash_config",
    "interpret_default",
    "lightning_attention_kernel",
    "lightning_config",
    "poison_outputs",
]

"""Pallas GPU kernels (Triton backend), importable as ``jaxattn.pallas``.

Every kernel runs in interpret mode on a CPU (``interpret=None`` picks that
automatically when no GPU is present), so the same tests run everywhere.
"""

from jaxattn.pallas._common import interpret_default, poison_outputs
from jaxattn.pallas.block_sparse import block_sparse_attention_kernel
from jaxattn.pallas.flash import FlashConfig, flash_attention, flash_config
from jaxattn.pallas.lightning import LightningConfig, lightning_attention_kernel, lightning_config
from jaxattn.pallas.linear_global import LinearGlobalConfig, linear_global_config, linear_global_kernel
from jaxattn.pallas.sage import SageConfig, sage_attention_kernel, sage_config

__all__ = [
    "FlashConfig",
    "LightningConfig",
    "LinearGlobalConfig",
    "SageConfig",
    "block_sparse_attention_kernel",
    "flash_attention",
    "flash_config",
    "interpret_default",
    "lightning_attention_kernel",
    "lightning_config",
    "linear_global_config",
    "linear_global_kernel",
    "poison_outputs",
    "sage_attention_kernel",
    "sage_config",
]

"""Public ops: one function per attention variant, each with ``impl="auto"|"pallas"|"xla"``."""

from jaxattn.ops.attention import attention
from jaxattn.ops.halo import halo_attention
from jaxattn.ops.lightning import lightning_attention, lightning_attention_step

__all__ = ["attention", "halo_attention", "lightning_attention", "lightning_attention_step"]

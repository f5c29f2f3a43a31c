"""Public ops: one function per attention variant, each with ``impl="auto"|"pallas"|"xla"``."""

from jaxattn.ops.attention import attention, attention_qkvpacked
from jaxattn.ops.block_sparse import BlockMask, block_sparse_attention, power_attention
from jaxattn.ops.halo import halo_attention, halo_attention_kv
from jaxattn.ops.landmark import landmark_attention, landmark_retrieval_attention
from jaxattn.ops.lightning import lightning_attention, lightning_attention_step
from jaxattn.ops.lightning_sp import lightning_attention_sp
from jaxattn.ops.ring_attention import from_zigzag, ring_attention, ring_attention_sp, to_zigzag, zigzag_permutation, zigzag_sp
from jaxattn.ops.linear_global import linear_global_attention
from jaxattn.ops.sage import sage_attention

__all__ = ["landmark_attention", "landmark_retrieval_attention", "BlockMask", "attention", "attention_qkvpacked", "block_sparse_attention", "power_attention", "halo_attention", "halo_attention_kv", "lightning_attention", "lightning_attention_sp", "ring_attention", "ring_attention_sp", "zigzag_permutation", "to_zigzag", "from_zigzag", "zigzag_sp", "lightning_attention_step", "sage_attention",
           "linear_global_attention"]

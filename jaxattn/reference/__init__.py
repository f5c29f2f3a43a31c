"""Plain jnp references written from the math, computed in fp32: the test oracles."""

from jaxattn.reference.attention import attention_reference
from jaxattn.reference.block_sparse import block_sparse_reference
from jaxattn.reference.halo import halo_reference
from jaxattn.reference.lightning import lightning_recurrent, lightning_reference
from jaxattn.reference.sage import sage_reference

__all__ = ["attention_reference", "block_sparse_reference", "halo_reference", "lightning_recurrent", "lightning_reference", "sage_reference"]

"""Plain jnp references written from the math, computed in fp32: the test oracles."""

from jaxattn.reference.attention import attention_reference
from jaxattn.reference.block_sparse import block_sparse_reference
from jaxattn.reference.gated_delta import gated_delta_reference
from jaxattn.reference.gated_linear import gated_linear_reference
from jaxattn.reference.halo import halo_reference
from jaxattn.reference.landmark import landmark_reference, landmark_weights
from jaxattn.reference.lightning import lightning_recurrent, lightning_reference
from jaxattn.reference.linear_global import linear_global_reference
from jaxattn.reference.moe import grouped_matmul_reference, moe_reference
from jaxattn.reference.moh import load_balance_reference, moh_gates_reference, moh_reference, query_norm_gates_reference
from jaxattn.reference.probing import efficient_probe_reference
from jaxattn.reference.sage import sage_reference
from jaxattn.reference.sparsifiner import sparsifiner_reference

__all__ = ["gated_delta_reference", "gated_linear_reference", "landmark_reference", "landmark_weights", "attention_reference", "block_sparse_reference", "halo_reference", "lightning_recurrent", "lightning_reference", "sage_reference", "sparsifiner_reference",
           "linear_global_reference", "efficient_probe_reference",
           "load_balance_reference", "moe_reference", "grouped_matmul_reference", "moh_gates_reference", "moh_reference", "query_norm_gates_reference"]

"""jaxattn: fast, tested attention variants for JAX.

``jaxattn.attention`` is softmax attention with Pallas flash kernels on GPU
(``jaxattn.decode_attention`` the split-KV kernel for decoding from a KV cache,
``jaxattn.paged_decode_attention`` the same from a paged cache);
``jaxattn.pallas`` holds the kernels, ``jaxattn.reference`` the fp32 oracles,
``jaxattn.bench`` the benchmark harness (``python -m jaxattn.bench``).
"""

from jaxattn.ops.attention import attention, attention_qkvpacked, varlen_attention
from jaxattn.ops.block_sparse import BlockMask, block_sparse_attention, power_attention
from jaxattn.ops.decode import append_kv, decode_attention, quantize_kv
from jaxattn.ops.dot_product_attention import dot_product_attention
from jaxattn.ops.paged_decode import append_paged_kv, paged_decode_attention
from jaxattn.ops.gated_delta import gated_delta_rule, gated_delta_rule_step
from jaxattn.ops.gated_delta_sp import gated_delta_rule_sp
from jaxattn.ops.gated_linear import gated_linear_attention, gated_linear_attention_sp, gated_linear_attention_step
from jaxattn.ops.halo import halo_attention, halo_attention_kv
from jaxattn.ops.landmark import landmark_attention, landmark_retrieval_attention
from jaxattn.ops.lightning import lightning_attention, lightning_attention_step
from jaxattn.ops.lightning_sp import lightning_attention_sp
from jaxattn.ops._spmd import batch_parallel, expert_parallel
from jaxattn.ops.ring_attention import from_zigzag, ring_attention, ring_attention_sp, to_zigzag, zigzag_permutation, zigzag_sp
from jaxattn.ops.grouped_matmul import grouped_matmul
from jaxattn.ops.mxfp4 import MXFP4, quantize_mxfp4
from jaxattn.ops.latent_decode import append_paged_latent, latent_decode_attention
from jaxattn.ops.linear_global import linear_global_attention
from jaxattn.ops.sage import sage_attention
from jaxattn.reference.attention import attention_reference

__version__ = "0.1.0"
__all__ = [
    "BlockMask", "block_sparse_attention", "power_attention",
    "append_kv", "attention", "batch_parallel", "expert_parallel", "attention_qkvpacked", "attention_reference", "decode_attention", "dot_product_attention", "landmark_attention", "landmark_retrieval_attention", "halo_attention", "halo_attention_kv", "lightning_attention", "lightning_attention_sp", "ring_attention", "ring_attention_sp", "zigzag_permutation", "to_zigzag", "from_zigzag", "zigzag_sp", "lightning_attention_step", "sage_attention",
    "linear_global_attention", "latent_decode_attention", "append_paged_latent", "gated_delta_rule", "gated_delta_rule_step", "gated_delta_rule_sp", "gated_linear_attention", "gated_linear_attention_sp", "gated_linear_attention_step", "grouped_matmul", "MXFP4", "quantize_mxfp4", "append_paged_kv", "paged_decode_attention", "quantize_kv", "varlen_attention",
    "__version__",
]


def __getattr__(name: str):
    """``jaxattn.layers`` / ``jaxattn.models`` / ``jaxattn.viz`` load on first use (they import Flax)."""
    if name in ("layers", "models", "viz"):
        import importlib

        return importlib.import_module(f"jaxattn.{name}")
    raise AttributeError(f"module 'jaxattn' has no attribute {name!r}")

"""A GPT-style decoder (pre-RMSNorm, RoPE, GQA softmax attention, SwiGLU MLP) in Flax NNX,
whose per-layer attention pattern is configurable: ``"full"`` (causal flash attention) or a
block-sparse pattern (``"power"``: PowerAttention; ``"window"``: sliding window; ``"sink"``:
sink + window) through ``jaxattn.block_sparse_attention``. Hybrids mix them, e.g.
``layer_types=("power", "power", "power", "full")`` repeated over the depth.

``quantized=True`` runs every full-attention layer through ``jaxattn.sage_attention``
(SageAttention2-style INT8 QK / FP8 PV, inference only).

Decoding keeps a KV cache (``init_cache``; ``prefill`` / ``decode_step`` for
:func:`jaxattn.models.generate`): full layers read it with :func:`jaxattn.decode_attention`
(split-KV flash-decoding; sliding-window layers through its ``local_window_size``), the
other block-sparse layers with a one-row ``BlockMask`` at the token's position. A quantized model prefills with SageAttention and decodes in the compute dtype.

The config also holds the block variants of pretrained families (:mod:`jaxattn.models.gpt_hf`): Qwen2's
q/k/v biases, Qwen3's q/k norms and wide heads (``head_dim``), Hugging Face's RoPE scalings
(``rope_scaling``: linear, Llama 3.1's, YaRN), and Gemma's offset norms, GeGLU, scaled embeddings,
post-norms, logit scale and soft caps (Gemma 2's ``attn_softcap`` runs inside the flash and decode
kernels; its sliding layers then use the flash kernel's own window), local RoPE base (Gemma 3); and the
classic block of GPT-2 / GPT-NeoX (:mod:`jaxattn.models.gpt_classic_hf`): LayerNorms (``norm="layer"``),
biases everywhere (``bias``), a plain GELU MLP (``mlp_gated=False``), learned positions
(``position="learned"``), parallel residuals (``parallel_residual``). ``moe_experts`` makes every MLP a
mixture of experts (:mod:`jaxattn.models.moe`; Mixtral, Qwen3-MoE, and with biases, attention sinks and
``mlp_act="gpt_oss"`` gpt-oss).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.models._remat import remat_blocks
from jaxattn.models.moe import ACTIVATIONS, EXPERT_FORMATS as MOE_FORMATS, IMPLS as MOE_IMPLS, MoE, gated_act
from jaxattn.models.vit import AttentionDropout, _apply, _dropout
from jaxattn.ops import _spmd
from jaxattn.ops.attention import attention
from jaxattn.pallas._common import document_index

LayerType = Literal["full", "power", "window", "sink"]
# (k, v) [batch, max_len, kv_heads, head_dim], plus (k_scale, v_scale) [kv_heads] for a quantized cache
KVCache = tuple[jax.Array, ...]
# quantized caches: the scales cover this many times the prompt's largest |k|, |v| (FP8 keeps its relative
# precision over a wide range, so 4x headroom is nearly free; int8 is uniform: 2x, a bit per value)
KV_SCALE_HEADROOM = {"float8_e4m3fn": 4.0, "float8_e5m2": 4.0, "int8": 2.0}


# layer kinds with a recurrent state instead of a KV cache (MiniMax's lightning, Gated DeltaNet, Kimi Delta Attention)
RECURRENT_KINDS = ("lightning", "delta", "kda", "mamba2")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    dim: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int | None = None  # GQA; defaults to heads
    mlp_dim: int | None = None  # SwiGLU hidden width; defaults to 8/3 dim rounded to 64
    layer_types: tuple[str, ...] = ("full",)  # cycled over the layers
    sparse_block: int = 64  # block size B of the block-sparse patterns
    window: int = 256  # sliding window W (tokens) of the power / window / sink patterns
    sink: int = 64  # sink tokens of the power / sink patterns
    rope_theta: float = 10000.0
    # RoPE frequency scaling for contexts past pretraining, as a Hugging Face ``rope_scaling`` dict:
    # {"rope_type": "linear" | "llama3" | "yarn" | "longrope", "factor": ..., ...} (see rope_frequencies); ()
    # is plain RoPE
    rope_scaling: tuple | Mapping = ()
    # partial rotary (Phi-4-mini, ...): RoPE on each head's first rotary_dim channels, the rest unrotated;
    # None: the whole head
    rotary_dim: int | None = None
    norm_eps: float = 1e-6  # RMSNorm epsilon (LLaMA: 1e-5, Qwen2: 1e-6)
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    head_dim: int | None = None  # per-head width; defaults to dim // heads (Qwen3, Mistral-Nemo: set apart)
    qk_norm: bool = False  # RMSNorm of each head's query and key before RoPE (Qwen3, Gemma 3)
    qk_norm_full: bool = False  # with qk_norm: one RMSNorm over all heads' queries (keys) together (OLMo 2)
    pre_norms: bool = True  # RMSNorm before attention and MLP; False (with post_norms): OLMo 2's post-norm blocks
    # the MLP's activation (Gemma: tanh GELU, GeGLU; gelu: erf; relu: OPT; gpt_oss: gpt-oss's clamped
    # (clip(up, -L, L) + 1) * g * sigmoid(1.702 g), g = min(gate, L), L = mlp_limit)
    mlp_act: Literal["silu", "gelu_tanh", "gelu", "relu", "gpt_oss"] = "silu"
    mlp_limit: float = 7.0  # mlp_act="gpt_oss": the clamp L (gpt-oss's swiglu_limit)
    # a mixture of experts in place of every layer's MLP (jaxattn.models.moe: Mixtral, Qwen3-MoE, gpt-oss):
    # moe_experts gated MLPs of width mlp_dim, moe_top_k per token; the router's top-k weights are the
    # softmax of the chosen logits (moe_renormalize) or their full-softmax probabilities; the router and the
    # experts have biases with mlp_bias (gpt-oss); training adds moe_aux_loss times the mean over layers of
    # the Switch load-balance loss; moe_impl: jaxattn.models.moe.moe_dispatch's impl
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_renormalize: bool = True
    moe_aux_loss: float = 0.01
    moe_impl: Literal["auto", "pallas", "ragged", "gather"] = "auto"
    moe_shared_dim: int = 0  # > 0: Qwen2-MoE's shared expert of this width beside the routed ones (sigmoid-gated)
    # DeepSeek's mixtures of experts: experts of width moe_dim (None: mlp_dim) after moe_dense_layers dense MLPs
    # (first_k_dense_replace); the router's scores a softmax or (V3) sigmoids, top-k within the best
    # moe_topk_groups of moe_groups expert groups, V3's selection bias (moe_score_bias, a buffer), the weights
    # times moe_routed_scale; the shared expert ungated (moe_shared_gate=False; Qwen2-MoE's is sigmoid-gated)
    moe_dim: int | None = None
    moe_dense_layers: int = 0
    moe_scoring: Literal["softmax", "sigmoid"] = "softmax"
    moe_groups: int = 1
    moe_topk_groups: int = 1
    moe_score_bias: bool = False
    moe_routed_scale: float = 1.0
    moe_shared_gate: bool = True
    # DeepSeek-V3's auxiliary-loss-free balancing: with moe_score_bias, each training forward moves every expert's
    # selection bias by this much towards the mean load (0: the bias stays as loaded)
    moe_bias_update_rate: float = 0.0
    # "mxfp4": the experts' weights stay in MXFP4 (gpt-oss's release format; constants, not trained;
    # dim and mlp_dim multiples of 32): a quarter of bf16's memory (jaxattn.models.moe)
    moe_format: Literal["float", "mxfp4"] = "float"
    # DeepSeek's multi-head latent attention (jaxattn.models.mla; kv_lora_rank > 0 turns it on): keys and values
    # from a kv_lora_rank-wide latent per token (the generation cache holds it and the shared RoPE key:
    # kv_lora_rank + qk_rope_dim numbers per token and layer), queries through a q_lora_rank bottleneck (0:
    # one projection); head_dim: each head's no-RoPE query/key width, qk_rope_dim the RoPE part's,
    # v_head_dim the values' (None: head_dim)
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_rope_dim: int = 64
    v_head_dim: int | None = None
    # MiniMax-01: layer_types entry "lightning" is its lightning attention layer (jaxattn.models.minimax); its
    # blocks add each branch to its normed input (norm_residual), x' = alpha norm(x) + beta branch(norm(x)), with
    # residual_scales (full alpha, full beta, lightning alpha, lightning beta, mlp alpha, mlp beta); () all 1
    norm_residual: bool = False
    residual_scales: tuple[float, ...] = ()
    # layer_types entry "delta": a Gated DeltaNet layer (jaxattn.models.deltanet) with a causal depthwise
    # convolution of delta_conv taps on its q, k, v; its value heads (default heads), query / key heads (default
    # delta_heads; each shared by delta_heads / delta_key_heads value heads, as Qwen3-Next's), query / key head
    # width (default head_size) and value head width (default delta_head_dim); entry "kda": Kimi Delta Attention
    # (jaxattn.models.deltanet.KimiDeltaLayer), the same with a decay per key channel (Kimi Linear); entry "mamba2":
    # a Mamba-2 layer (jaxattn.models.mamba2): delta_heads heads of width delta_value_dim (headdim), delta_key_heads
    # groups (ngroups), state size delta_head_dim (d_state)
    delta_conv: int = 4
    delta_heads: int | None = None
    delta_key_heads: int | None = None
    delta_head_dim: int | None = None
    delta_value_dim: int | None = None
    # Qwen3-Next's gated attention: softmax layers' outputs times sigmoid(W_g x) per channel before W_o
    attn_output_gate: bool = False
    # the Gemma family (Gemma 1/2/3)
    norm_offset: float = 0.0  # RMSNorms scale by (norm_offset + weight): Gemma stores weight - 1 (offset 1)
    post_norms: bool = False  # Gemma 2/3: RMSNorm on the attention and MLP outputs before each residual add
    embed_scale: bool = False  # Gemma: embeddings times sqrt(dim), rounded to the compute dtype
    attn_scale: float | None = None  # logit scale; None: 1 / sqrt(head_dim) (Gemma: query_pre_attn_scalar ** -0.5)
    attn_softcap: float | None = None  # Gemma 2: attention logits -> cap * tanh(logits / cap) (full, window layers)
    final_softcap: float | None = None  # Gemma 2: the same on the output logits
    # gpt-oss: attention sinks, a learned logit per head in every row's softmax that carries no value
    # (every layer kind, quantized ones too; the kernels' online softmax starts each row from it)
    attn_sinks: bool = False
    local_rope_theta: float | None = None  # Gemma 3: the "window" layers' RoPE base (plain RoPE there)
    # per layer (cycled like layer_types): False runs that layer without RoPE (SmolLM3's NoPE layers); () all RoPE
    rope_layers: tuple[bool, ...] = ()
    # IBM Granite's scalars: embeddings times embed_multiplier, each branch's output times residual_multiplier
    # before its residual add, logits divided by logits_divisor (its logits_scaling)
    embed_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_divisor: float = 1.0
    position: Literal["rope", "alibi", "learned"] = "rope"  # alibi: per-head linear biases; learned: GPT-2's table
    alibi_scale: float = 1.0  # position="alibi": the slopes times this (Falcon-RW adds ALiBi before 1/sqrt(d))
    max_positions: int = 1024  # position="learned": the table's length (the longest context)
    position_offset: int = 0  # position="learned": position p reads table row p + offset (OPT's 2 extra rows)
    # the GPT-2 / GPT-NeoX (Pythia) block (jaxattn.models.gpt_classic_hf): LayerNorms with biases instead of
    # RMSNorms, biases on every projection, a plain (ungated) MLP, and attention and MLP side by side
    norm: Literal["rms", "layer"] = "rms"
    bias: bool = False  # biases on q, k, v, o and the MLP's projections
    mlp_bias: bool | None = None  # biases on the MLP's projections; None: as ``bias`` (GPT-J: MLP only)
    mlp_gated: bool = True  # False: down(act(up(x))) (GPT-2, NeoX; mlp_dim defaults to 4 dim), else a GLU
    parallel_residual: bool = False  # x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX's use_parallel_residual)
    shared_norm: bool = False  # with parallel_residual: one norm for both branches, x + attn(h) + mlp(h) (Phi-1/2)
    head_bias: bool = False  # a bias on the untied output head (Phi-1/2)
    embed_norm: bool = False  # a norm (of the blocks' kind) on the token embeddings (BLOOM's word_embeddings_layernorm)
    # OPT-350m: each norm after its residual add, x = norm1(x + attn(x)), x = norm2(x + mlp(x)) (the original
    # Transformer's post-LN; no final norm), and token embeddings of embed_dim projected in to dim (after the
    # embedding, before the positions are added) and back out before the (tied) head, without biases
    post_ln: bool = False
    embed_dim: int | None = None
    init_std: float = 0.02
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype; parameters are fp32
    attn_impl: Literal["auto", "pallas", "xla"] = "auto"
    quantized: bool = False
    # KV cache storage for generation: None (compute dtype) or "float8_e4m3fn" / "float8_e5m2" / "int8"
    # (scales per layer and kv head from the prompt, with headroom; see jaxattn.quantize_kv)
    kv_cache_dtype: str | None = None
    # nanoGPT-style dropout in train mode: on the attention weights (inside the flash / block-sparse
    # kernels), on the attention and MLP outputs before the residual add, and on the embeddings
    dropout: float = 0.0
    # activation checkpointing (training): each block's activations are recomputed in the backward
    # instead of kept, so memory holds one block's, not every layer's (about a third more compute)
    remat: bool = False

    def __post_init__(self):
        kv = self.kv_heads or self.heads
        if self.head_dim is None and self.dim % self.heads or self.heads % kv:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads} (or head_dim set), and heads "
                             f"by kv_heads {kv}")
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
            raise ValueError(f"head_dim must be a positive even number (RoPE rotates halves), got {self.head_dim}")
        object.__setattr__(self, "rope_scaling", _rope_scaling(self.rope_scaling))
        if (self.rope_scaling or self.local_rope_theta or self.rotary_dim) and self.position != "rope":
            raise ValueError("rope_scaling, rotary_dim and local_rope_theta need position='rope'")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_size and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim must be a positive even number up to the head width {self.head_size}, "
                             f"got {self.rotary_dim}")
        scaling = dict(self.rope_scaling)
        if scaling.get("rope_type") == "longrope":
            half = (self.rotary_dim or self.head_size) // 2
            for name in ("short_factor", "long_factor"):
                if len(scaling[name]) != half:
                    raise ValueError(f"rope_scaling {name}: one factor per rotated channel pair ({half}), got "
                                     f"{len(scaling[name])}")
        if self.mlp_act not in ACTIVATIONS:
            raise ValueError(f"mlp_act must be one of {ACTIVATIONS}, got {self.mlp_act!r}")
        if not self.mlp_limit > 0:
            raise ValueError(f"mlp_limit must be positive, got {self.mlp_limit}")
        if self.mlp_act == "gpt_oss" and not self.mlp_gated:
            raise ValueError("mlp_act='gpt_oss' gates: it needs mlp_gated=True")
        if self.moe_experts < 0 or self.moe_experts and not 1 <= self.moe_top_k <= self.moe_experts:
            raise ValueError(f"moe_experts must be >= 0 (0: a dense MLP) and 1 <= moe_top_k <= moe_experts, got "
                             f"moe_experts={self.moe_experts}, moe_top_k={self.moe_top_k}")
        if self.moe_experts and not self.mlp_gated:
            raise ValueError("moe_experts: the experts are gated MLPs (mlp_gated=True)")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        if self.moe_shared_dim < 0 or self.moe_shared_dim and not self.moe_experts:
            raise ValueError(f"moe_shared_dim ({self.moe_shared_dim}) is a mixture of experts' shared expert: it "
                             "needs moe_experts and must be >= 0")
        if self.moe_format not in MOE_FORMATS:
            raise ValueError(f"moe_format must be one of {MOE_FORMATS}, got {self.moe_format!r}")
        if self.moe_format == "mxfp4" and (not self.moe_experts or self.dim % 32 or self.expert_hidden % 32):
            raise ValueError(f"moe_format='mxfp4' packs a mixture of experts' weights in groups of 32: it needs "
                             f"moe_experts and dim ({self.dim}) and the experts' width ({self.expert_hidden}) "
                             "multiples of 32")
        if self.moe_scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"moe_scoring must be 'softmax' or 'sigmoid', got {self.moe_scoring!r}")
        if self.moe_groups < 1 or self.moe_experts % self.moe_groups or not 1 <= self.moe_topk_groups <= self.moe_groups \
                or self.moe_groups > 1 and self.moe_top_k > self.moe_topk_groups * (self.moe_experts // self.moe_groups):
            raise ValueError(f"moe_groups ({self.moe_groups}) must divide moe_experts ({self.moe_experts}), with 1 <= "
                             f"moe_topk_groups ({self.moe_topk_groups}) <= moe_groups and room in the chosen groups for "
                             f"moe_top_k ({self.moe_top_k})")
        if not self.moe_routed_scale > 0 or self.moe_dense_layers < 0 or (self.moe_dim or 1) < 1:
            raise ValueError(f"moe_routed_scale ({self.moe_routed_scale}) must be positive, moe_dense_layers "
                             f"({self.moe_dense_layers}) >= 0 and moe_dim ({self.moe_dim}) positive or None")
        if self.moe_bias_update_rate < 0 or self.moe_bias_update_rate and not self.moe_score_bias:
            raise ValueError(f"moe_bias_update_rate ({self.moe_bias_update_rate}) moves the experts' selection bias: "
                             "it needs moe_score_bias and must be >= 0")
        if self.kv_lora_rank:
            self._check_mla()
        if self.moe_aux_loss < 0:
            raise ValueError(f"moe_aux_loss must be >= 0, got {self.moe_aux_loss}")
        if self.position_offset and self.position != "learned" or self.position_offset < 0:
            raise ValueError(f"position_offset ({self.position_offset}) shifts a learned position table: it needs "
                             "position='learned' and must be >= 0")
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"norm must be 'rms' or 'layer', got {self.norm!r}")
        if self.norm == "layer" and self.norm_offset:
            raise ValueError("norm_offset is Gemma's RMSNorm weight offset: it needs norm='rms'")
        if self.parallel_residual and (not self.pre_norms or self.post_norms):
            raise ValueError("parallel_residual (GPT-NeoX) needs pre_norms=True and post_norms=False")
        if self.shared_norm and not self.parallel_residual:
            raise ValueError("shared_norm (Phi: one norm before attention and MLP side by side) needs parallel_residual")
        if self.head_bias and self.tie_embeddings:
            raise ValueError("head_bias is the untied output head's bias: it needs tie_embeddings=False")
        if self.max_positions < 1:
            raise ValueError(f"max_positions must be positive, got {self.max_positions}")
        for name in ("attn_scale", "attn_softcap", "final_softcap"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive or None, got {getattr(self, name)}")
        object.__setattr__(self, "rope_layers", tuple(bool(r) for r in self.rope_layers))
        if self.rope_layers and self.position != "rope":
            raise ValueError("rope_layers needs position='rope'")
        for name in ("embed_multiplier", "residual_multiplier", "logits_divisor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.qk_norm_full and not self.qk_norm:
            raise ValueError("qk_norm_full widens qk_norm: set qk_norm=True too")
        if not (self.pre_norms or self.post_norms):
            raise ValueError("a block needs pre_norms or post_norms (or both)")
        if self.post_ln and (not self.pre_norms or self.post_norms or self.parallel_residual):
            raise ValueError("post_ln moves the two block norms after the residual adds: it needs pre_norms=True (the "
                             "norms it moves), post_norms=False and sequential residuals")
        if self.embed_dim is not None and self.embed_dim < 1:
            raise ValueError(f"embed_dim must be positive or None, got {self.embed_dim}")
        if self.attn_softcap is not None and (set(self.layer_types) - {"full", "window"} or self.quantized):
            raise ValueError("attn_softcap runs on the flash and decode kernels: layer_types may hold only 'full' and "
                             "'window', and quantized=False")
        bad = [t for t in self.layer_types if t not in ("full", "power", "window", "sink", *RECURRENT_KINDS)]
        if bad or not self.layer_types:
            raise ValueError(f"layer_types entries must be 'full', 'power', 'window', 'sink', 'lightning', 'delta', "
                             f"'kda' or 'mamba2', got {self.layer_types}")
        if self.delta_conv < 1:
            raise ValueError(f"delta_conv (the Gated DeltaNet layers' convolution taps) must be >= 1, got {self.delta_conv}")
        h, hk, dk, dv = self.delta_dims
        if min(h, hk, dk, dv) < 1 or h % hk:
            raise ValueError(f"delta_heads ({h}) must be a positive multiple of delta_key_heads ({hk}), and the delta "
                             f"layers' head widths positive (delta_head_dim {dk}, delta_value_dim {dv})")
        if len(self.residual_scales) not in (0, 6) or (self.residual_scales and not self.norm_residual):
            raise ValueError(f"residual_scales are MiniMax's (full alpha, full beta, lightning alpha, lightning beta, "
                             f"mlp alpha, mlp beta) of norm_residual blocks: () or 6 numbers with norm_residual, got "
                             f"{self.residual_scales}")
        if self.norm_residual and (not self.pre_norms or self.post_norms or self.parallel_residual or self.post_ln):
            raise ValueError("norm_residual (MiniMax: each branch's residual is its normed input) needs pre_norms and "
                             "sequential residuals, without post_norms or post_ln")
        if self.kv_cache_dtype not in (None, "float8_e4m3fn", "float8_e5m2", "int8"):
            raise ValueError(f"kv_cache_dtype must be None, 'float8_e4m3fn', 'float8_e5m2' or 'int8', got "
                             f"{self.kv_cache_dtype!r}")
        if self.kv_cache_dtype is not None and set(self.layer_types) - {"full", "window"}:
            raise ValueError("a quantized KV cache decodes with decode_attention: layer_types may hold only "
                             f"'full' and 'window', got {self.layer_types}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.dropout and self.quantized:
            raise ValueError("dropout is for training; quantized=True is an inference path (no gradients)")
        if self.position not in ("rope", "alibi", "learned"):
            raise ValueError(f"position must be 'rope', 'alibi' or 'learned', got {self.position!r}")
        if self.alibi_scale != 1.0 and (self.position != "alibi" or not self.alibi_scale > 0):
            raise ValueError(f"alibi_scale ({self.alibi_scale}) scales ALiBi's slopes: it needs position='alibi' and "
                             "must be positive")
        if self.position == "alibi" and (set(self.layer_types) != {"full"} or self.quantized):
            raise ValueError("position='alibi' runs on the flash and decode kernels: it needs layer_types=('full',) "
                             "and quantized=False")

    def _check_mla(self) -> None:
        if self.kv_lora_rank < 1 or self.q_lora_rank < 0 or self.qk_rope_dim < 2 or self.qk_rope_dim % 2 \
                or (self.v_head_dim or 1) < 1:
            raise ValueError(f"multi-head latent attention needs kv_lora_rank >= 1, q_lora_rank >= 0, an even "
                             f"qk_rope_dim >= 2 and v_head_dim >= 1, got {self.kv_lora_rank}, {self.q_lora_rank}, "
                             f"{self.qk_rope_dim}, {self.v_head_dim}")
        bad = [n for n, on in (("layer_types other than 'full' (and Kimi Linear's 'kda' / Gated DeltaNet's 'delta')",
                                set(self.layer_types) - {"full", "kda", "delta"} or "full" not in self.layer_types),
                               ("position other than 'rope'", self.position != "rope"), ("qk_norm", self.qk_norm),
                               ("qkv_bias / bias", self.qkv_bias or self.bias), ("attn_sinks", self.attn_sinks),
                               ("attn_output_gate", self.attn_output_gate),
                               ("attn_softcap", self.attn_softcap is not None), ("rotary_dim", self.rotary_dim),
                               ("quantized", self.quantized), ("kv_cache_dtype", self.kv_cache_dtype),
                               ("local_rope_theta", self.local_rope_theta), ("kv_heads", self.kv_heads not in
                                                                             (None, self.heads))) if on]
        if bad:
            raise ValueError(f"multi-head latent attention (kv_lora_rank) has full causal layers with its own "
                             f"latent cache; it does not combine with {', '.join(bad)}")

    @property
    def v_size(self) -> int:
        """Each head's value width: ``v_head_dim``, or the head width."""
        return self.v_head_dim or self.head_size

    @property
    def expert_hidden(self) -> int:
        """A mixture of experts' expert width: ``moe_dim``, or the MLP's."""
        return self.moe_dim or self.hidden

    @property
    def mlp_has_bias(self) -> bool:
        return self.bias if self.mlp_bias is None else self.mlp_bias

    def layer_type(self, i: int) -> str:
        return self.layer_types[i % len(self.layer_types)]

    def layer_has_rope(self, i: int) -> bool:
        return self.position == "rope" and (not self.rope_layers or self.rope_layers[i % len(self.rope_layers)])

    @property
    def delta_dims(self) -> tuple[int, int, int, int]:
        """The Gated DeltaNet layers' (value heads, query / key heads, query / key width, value width)."""
        h = self.delta_heads or self.heads
        dk = self.delta_head_dim or self.head_size
        return h, self.delta_key_heads or h, dk, self.delta_value_dim or dk

    @property
    def hidden(self) -> int:
        """The MLP's hidden width: ``mlp_dim``, or 8/3 dim rounded up to 64 (gated), 4 dim (plain)."""
        return self.mlp_dim or (64 * -(-int(8 * self.dim / 3) // 64) if self.mlp_gated else 4 * self.dim)

    @property
    def head_size(self) -> int:
        """Each head's width: ``head_dim``, or ``dim // heads``."""
        return self.head_dim or self.dim // self.heads


ROPE_SCALING_KEYS = {
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
             "mscale_all_dim", "truncate"},
    "longrope": {"short_factor", "long_factor", "original_max_position_embeddings", "factor", "attention_factor"},
}
_ROPE_REQUIRED = {"linear": {"factor"}, "llama3": ROPE_SCALING_KEYS["llama3"],
                  "yarn": {"factor", "original_max_position_embeddings"},
                  "longrope": {"short_factor", "long_factor", "original_max_position_embeddings"}}


def _rope_scaling(spec) -> tuple:
    """A ``rope_scaling`` dict (or its items) checked and frozen as sorted items, the rope type first."""
    if not spec:
        return ()
    try:
        d = dict(spec)
    except (TypeError, ValueError):
        raise ValueError(f"rope_scaling must be a dict (Hugging Face's rope_scaling: {{'rope_type': 'linear', "
                         f"'factor': 4.0}}) or its items, got {spec!r}") from None
    kind = d.pop("rope_type", d.pop("type", None))
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"rope_scaling: rope_type must be one of {sorted(ROPE_SCALING_KEYS)} (dynamic NTK "
                         f"scaling is not supported), got {kind!r}")
    d = {k: v for k, v in d.items() if v is not None}
    unknown, missing = set(d) - ROPE_SCALING_KEYS[kind], _ROPE_REQUIRED[kind] - set(d)
    if unknown or missing:
        raise ValueError(f"rope_scaling {kind!r}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)} "
                         f"(keys: {sorted(ROPE_SCALING_KEYS[kind])})")
    if "factor" in d and float(d["factor"]) <= 0:
        raise ValueError(f"rope_scaling: factor must be positive, got {d['factor']}")
    if kind == "longrope":
        if "factor" not in d and "attention_factor" not in d:
            raise ValueError("rope_scaling 'longrope': give factor (the context's growth over "
                             "original_max_position_embeddings) or attention_factor")
        for name in ("short_factor", "long_factor"):  # frozen: the config stays hashable
            try:
                d[name] = tuple(float(f) for f in d[name])
            except (TypeError, ValueError):
                raise ValueError(f"rope_scaling {name} must be a list of numbers, got {d[name]!r}") from None
            if not all(f > 0 for f in d[name]):
                raise ValueError(f"rope_scaling {name}: factors must be positive")
    return (("rope_type", kind), *sorted(d.items()))


def yarn_mscale(factor: float, m: float = 1.0) -> float:
    """YaRN's magnitude scale ``0.1 m ln(factor) + 1`` (1 for ``factor <= 1``)."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


@functools.lru_cache(maxsize=64)
def rope_frequencies(head_dim: int, theta: float, scaling: tuple = (), long: bool = False
                     ) -> tuple[np.ndarray, float]:
    """RoPE's inverse frequencies ``[head_dim / 2]`` (fp32) and the factor on cos/sin, as Hugging Face
    computes them for ``rope_scaling`` (``GPTConfig.rope_scaling``'s frozen items; ``head_dim``: the
    rotated width):

    - ``linear`` (position interpolation): every frequency divided by ``factor``;
    - ``llama3`` (Llama 3.1+): wavelengths above ``original_max_position_embeddings / low_freq_factor``
      divided by ``factor``, below ``... / high_freq_factor`` kept, a linear blend in ``1 / wavelength``
      between;
    - ``yarn`` (YaRN): per dimension, a ramp from interpolated (``/ factor``) to extrapolated (kept)
      frequencies between the dimensions that turn ``beta_slow`` and ``beta_fast`` times over the original
      context, and cos/sin scaled by ``attention_factor`` (default ``0.1 ln(factor) + 1``, or from ``mscale``
      / ``mscale_all_dim``);
    - ``longrope`` (LongRoPE: Phi-3 128k, Phi-3.5, Phi-4-mini): each frequency divided by its own factor,
      ``short_factor`` (``long`` False) or ``long_factor`` (``long``: a sequence past
      ``original_max_position_embeddings``; :func:`rope` picks), and cos/sin scaled by ``attention_factor``
      (default ``sqrt(1 + ln(factor) / ln(original_max_position_embeddings))``)."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    s = dict(scaling)
    kind, attn = s.pop("rope_type", "default"), 1.0
    if kind == "longrope":
        inv = inv / np.asarray(s["long_factor" if long else "short_factor"], np.float64)
        attn = s.get("attention_factor")
        if attn is None:
            factor, old = float(s["factor"]), float(s["original_max_position_embeddings"])
            attn = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old))
    elif kind == "linear":
        inv = inv / s["factor"]
    elif kind == "llama3":
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = np.where(wavelen > old / lo, inv / factor, np.where(wavelen < old / hi, inv, blended))
    elif kind == "yarn":
        factor, old = float(s["factor"]), float(s["original_max_position_embeddings"])

        attn = s.get("attention_factor")
        if attn is None:
            m, m_all = s.get("mscale"), s.get("mscale_all_dim")
            attn = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)

        def dim_of(rotations):  # the dimension whose wavelength fits `rotations` times in the original context
            return head_dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_of(s.get("beta_fast") or 32), dim_of(s.get("beta_slow") or 1)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        ramp = np.clip((np.arange(head_dim // 2) - low) / ((high - low) or 0.001), 0, 1)
        inv = inv / factor * ramp + inv * (1 - ramp)
    return inv.astype(np.float32), float(attn)


# the block options of pretrained families (jaxattn.models.gpt_hf): a plain LLaMA block leaves them at their defaults
FAMILY_FIELDS = ("qk_norm", "qk_norm_full", "pre_norms", "rope_scaling", "rotary_dim", "rope_layers", "mlp_act",
                 "norm_offset",
                 "post_norms", "embed_scale", "attn_scale", "attn_softcap", "final_softcap", "local_rope_theta",
                 "embed_multiplier", "residual_multiplier", "logits_divisor")
# the GPT-2 / GPT-NeoX block options (jaxattn.models.gpt_classic_hf)
CLASSIC_FIELDS = ("norm", "bias", "mlp_bias", "mlp_gated", "parallel_residual", "shared_norm", "head_bias",
                  "embed_norm", "alibi_scale", "post_ln", "embed_dim")


def non_default(cfg: GPTConfig, names: tuple[str, ...]) -> list[str]:
    """The fields among ``names`` whose value in ``cfg`` is not :class:`GPTConfig`'s default."""
    base = GPTConfig()
    return [n for n in names if getattr(cfg, n) != getattr(base, n)]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float = 1e-6) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * weight).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float, scaling: tuple = (), rotary_dim: int | None = None
         ) -> jax.Array:
    """Rotary embedding of ``x [B, N, H, d]`` at ``positions [N]`` or ``[B, N]`` (halves rotated, as GPT-NeoX/LLaMA),
    with ``rope_frequencies``' scaling; ``rotary_dim``: only the first that many channels rotate. LongRoPE
    takes its long factors when the last position is past the original context (as Hugging Face, per
    call: a prefill and the decode steps after it choose each for themselves)."""
    d = rotary_dim or x.shape[-1]
    freq, attn = rope_frequencies(d, float(theta), scaling)
    freq, s = jnp.asarray(freq), dict(scaling)
    if s.get("rope_type") == "longrope":
        long_freq = jnp.asarray(rope_frequencies(d, float(theta), scaling, True)[0])
        freq = jnp.where(jnp.max(positions) + 1 > s["original_max_position_embeddings"], long_freq, freq)
    ang = positions.astype(jnp.float32)[..., None] * freq  # [(B,) N, d/2]
    cos, sin = jnp.cos(ang)[..., None, :], jnp.sin(ang)[..., None, :]  # (a heads axis)
    if attn != 1.0:
        cos, sin = cos * attn, sin * attn
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf[..., :d], 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, xf[..., d:]], axis=-1).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm scaling by ``offset + weight`` (Gemma keeps ``weight - 1``: ``offset=1``, weights start at 0)."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0):
        self.weight = nnx.Param(jnp.full((dim,), 1.0 - offset, jnp.float32))
        self.eps, self.offset = eps, offset

    def __call__(self, x):
        w = self.weight[...]
        return rms_norm(x, w + self.offset if self.offset else w, self.eps)


class LayerNorm(nnx.Module):
    """LayerNorm with a weight and a bias, computed in fp32 (GPT-2, GPT-NeoX)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        mu = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
        return ((xf - mu) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]).astype(x.dtype)


def _norm(cfg: GPTConfig) -> nnx.Module:
    """The blocks' and the final norm: an RMSNorm (LLaMA, with Gemma's offset) or a LayerNorm (GPT-2, NeoX)."""
    return LayerNorm(cfg.dim, cfg.norm_eps) if cfg.norm == "layer" else RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)


def _linear(din: int, dout: int, cfg: GPTConfig, rngs: nnx.Rngs, std: float | None = None,
            bias: bool = False) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=bias, kernel_init=nnx.initializers.normal(std or cfg.init_std),
                      dtype=jnp.dtype(cfg.dtype), rngs=rngs)


def block_mask_for(cfg: GPTConfig, layer_type: str, seq_len: int, *, kv_len: int | None = None,
                   q_offset: int | jax.Array | None = None):
    """The ``jaxattn.BlockMask`` of a sparse layer type for ``seq_len`` queries (causal); for a
    cache, ``kv_len`` keys with query row 0 at position ``q_offset``."""
    from jaxattn.ops.block_sparse import BlockMask

    b, kw = cfg.sparse_block, dict(kv_len=kv_len, q_offset=q_offset)
    if layer_type == "power":
        return BlockMask.power(seq_len, b, window=cfg.window, sink=cfg.sink, **kw)
    if layer_type == "window":
        return BlockMask.sliding_window(seq_len, b, window=cfg.window, **kw)
    return BlockMask.sink_window(seq_len, b, window=cfg.window, sink=cfg.sink, **kw)


class Attention(nnx.Module):
    def __init__(self, cfg: GPTConfig, layer: int, *, rngs: nnx.Rngs):
        self.cfg, self.kind, self.rope = cfg, cfg.layer_type(layer), cfg.layer_has_rope(layer)
        self.kv_heads = cfg.kv_heads or cfg.heads
        self.head_dim = cfg.head_size
        width = cfg.heads * self.head_dim
        self.q = _linear(cfg.dim, width, cfg, rngs, bias=cfg.qkv_bias or cfg.bias)
        # k and v per kv head side by side: columns [k_0 | v_0 | k_1 | v_1 | ...], head_dim each
        self.kv = _linear(cfg.dim, 2 * self.kv_heads * self.head_dim, cfg, rngs, bias=cfg.qkv_bias or cfg.bias)
        self.o = _linear(width, cfg.dim, cfg, rngs, std=cfg.init_std / (2 * cfg.layers) ** 0.5, bias=cfg.bias)
        self.gate = _linear(cfg.dim, width, cfg, rngs) if cfg.attn_output_gate else None  # (Qwen3-Next)
        # Qwen3: RMSNorm over each head's query / key (one weight shared by the heads)
        q_width, k_width = (width, self.kv_heads * self.head_dim) if cfg.qk_norm_full else (self.head_dim,) * 2
        self.q_norm = RMSNorm(q_width, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_width, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.attn_drop = AttentionDropout(cfg.dropout, rngs=rngs)  # inside the kernels
        self.resid_drop = _dropout(cfg.dropout, rngs)
        # (mesh, axis, batch_axis, layout): GPT.enable_sequence_parallel
        self.sequence_parallel: tuple | None = None
        self.sinks = nnx.Param(jnp.zeros((cfg.heads,), jnp.float32)) if cfg.attn_sinks else None

    def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None,
                 offset: jax.Array | int = 0, segment_ids: jax.Array | None = None
                 ) -> jax.Array | tuple[jax.Array, KVCache]:
        """``x [B, n, dim]`` at ``positions``; with a ``cache`` (k, v ``[B, S, kv_heads, d]``), the
        new keys/values are written at ``offset`` and the queries attend to the cache (returns
        ``(out, cache)``); ``segment_ids [B, n]`` (no cache): packed documents, each attending
        within itself."""
        b, n, _ = x.shape
        q = self.q(x).reshape(b, n, self.cfg.heads, self.head_dim)
        k, v = jnp.split(self.kv(x).reshape(b, n, self.kv_heads, 2 * self.head_dim), 2, axis=-1)
        if self.q_norm is not None and self.cfg.qk_norm_full:  # (OLMo 2: over all heads at once)
            q = self.q_norm(q.reshape(b, n, -1)).reshape(q.shape)
            k = self.k_norm(k.reshape(b, n, -1)).reshape(k.shape)
        elif self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            theta, scaling = self.cfg.rope_theta, self.cfg.rope_scaling
            if self.kind == "window" and self.cfg.local_rope_theta:  # Gemma 3's local layers
                theta, scaling = self.cfg.local_rope_theta, ()
            q, k = (rope(t, positions, theta, scaling, self.cfg.rotary_dim) for t in (q, k))
        gate = None if self.gate is None else self.gate(x)
        if cache is None:  # (a zig-zag sequence-parallel model has permuted its tokens)
            return self._attend(q, k, v, zigzagged=True, segment_ids=segment_ids, gate=gate)
        from jaxattn.ops.decode import append_kv, decode_attention, quantize_kv

        prefill = isinstance(offset, int) and offset == 0
        k_cache, v_cache, *scales = cache
        if scales and prefill:  # a quantized cache takes its scales from the prompt, with headroom
            room = KV_SCALE_HEADROOM[jnp.dtype(k_cache.dtype).name]
            scales = [quantize_kv(x)[1] * room for x in (k, v)]
        sc = dict(k_scale=scales[0], v_scale=scales[1]) if scales else {}
        k_cache, v_cache, lengths = append_kv(k_cache, v_cache, k, v, jnp.asarray(offset, jnp.int32), **sc)
        new_cache = (k_cache, v_cache, *scales)
        if prefill:  # the prompt alone, as in training
            return self._attend(q, k, v, gate=gate), new_cache
        if self.kind in ("full", "window"):  # a window layer sees the last `window` keys, itself included
            window = (self.cfg.window - 1, 0) if self.kind == "window" else None
            o = decode_attention(q, k_cache, v_cache, lengths, causal=True, local_window_size=window,
                                 alibi_slopes=self.alibi_slopes(), impl=self.cfg.attn_impl, scale=self.cfg.attn_scale,
                                 logits_soft_cap=self.cfg.attn_softcap, sinks=self.sink_logits(), **sc)
        else:
            from jaxattn.ops.block_sparse import block_sparse_attention

            mask = block_mask_for(self.cfg, self.kind, n, kv_len=k_cache.shape[1], q_offset=offset)
            o = block_sparse_attention(q, k_cache, v_cache, mask, impl=self.cfg.attn_impl, scale=self.cfg.attn_scale,
                                       sinks=self.sink_logits())
        return self._project(o, gate), new_cache

    def _project(self, o: jax.Array, gate: jax.Array | None) -> jax.Array:
        """``W_o`` of the heads' outputs ``[B, n, heads, d]`` (times ``sigmoid(gate)`` first: gated attention)."""
        o = o.reshape(*o.shape[:2], -1)
        if gate is not None:
            o = o * jax.nn.sigmoid(gate.astype(jnp.float32)).astype(o.dtype)
        return self.o(o)

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, zigzagged: bool = False,
                segment_ids: jax.Array | None = None, gate: jax.Array | None = None) -> jax.Array:
        """Causal attention of the layer's kind over the ``n`` tokens themselves (``zigzagged``: in
        the zig-zag order of a sequence-parallel model's forward; ``segment_ids``: packed documents;
        ``gate``: the output gate's logits)."""
        b, n = q.shape[:2]
        impl, scale, cap = self.cfg.attn_impl, self.cfg.attn_scale, self.cfg.attn_softcap
        drop = self.attn_drop()
        seg = {} if segment_ids is None else {"segment_ids": segment_ids}
        sinks = self.sink_logits()
        if seg and self.kind not in ("full", "window"):
            raise ValueError(f"segment_ids (packed documents) need full or sliding-window attention layers; this model "
                             f"has {self.kind!r} layers: their block pattern lies on the packed row's positions, so a "
                             "document would not see what it sees alone (for that masking, call "
                             "jaxattn.block_sparse_attention(segment_ids=...) yourself)")
        if _spmd.use_shards(self.sequence_parallel, q.shape, zigzagged) and self.kind in ("full", "window") \
                and not self.cfg.quantized:  # (zigzagged: the forward without a cache)
            from jaxattn.ops.ring_attention import ring_attention_sp

            mesh, axis, batch_axis, layout = self.sequence_parallel
            window = (self.cfg.window - 1, 0) if self.kind == "window" else None
            o = ring_attention_sp(q, k, v, mesh=mesh, axis=axis, batch_axis=batch_axis, causal=True, scale=scale,
                                  local_window_size=window, logits_soft_cap=cap, alibi_slopes=self.alibi_slopes(),
                                  sinks=sinks, impl=impl, layout=layout, zigzagged=zigzagged and layout == "zigzag",
                                  **drop, **seg)
        elif self.kind == "window" and (cap is not None or seg or sinks is not None):  # soft-capped (Gemma 2),
            # packed documents or sinks: the flash kernel's own window (the block-sparse pattern's token window)
            o = attention(q, k, v, causal=True, local_window_size=(self.cfg.window - 1, 0), scale=scale,
                          logits_soft_cap=cap, sinks=sinks, impl=impl, **drop, **seg)
        elif self.kind != "full":
            from jaxattn.ops.block_sparse import block_sparse_attention

            o = block_sparse_attention(q, k, v, block_mask_for(self.cfg, self.kind, n), impl=impl, scale=scale,
                                       sinks=sinks, **drop)
        elif self.cfg.quantized:
            from jaxattn.ops.sage import sage_attention

            o = sage_attention(q, k, v, causal=True, scale=scale, impl=impl, sinks=sinks, **seg)
        else:
            o = attention(q, k, v, causal=True, alibi_slopes=self.alibi_slopes(), scale=scale, logits_soft_cap=cap,
                          sinks=sinks, impl=impl, **drop, **seg)
        return _apply(self.resid_drop, self._project(o, gate))

    def sink_logits(self) -> jax.Array | None:
        """The attention sinks' logits ``[heads]`` (``attn_sinks``), or None."""
        return None if self.sinks is None else self.sinks[...]

    def alibi_slopes(self) -> jax.Array | None:
        """ALiBi's per-head slopes (a geometric sequence, interleaved for non-powers of two)."""
        if self.cfg.position != "alibi":
            return None
        from jaxattn.models.tnl import tnl_slopes

        return jnp.asarray(tnl_slopes(self.cfg.heads), jnp.float32) * self.cfg.alibi_scale


class SwiGLU(nnx.Module):
    """The MLP: ``down(act(gate) * up)`` from one fused ``gate_up`` projection (SwiGLU; GeGLU with Gemma's
    tanh GELU), or, ``mlp_gated=False``, ``down(act(up(x)))`` (GPT-2, GPT-NeoX)."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        if cfg.mlp_gated:
            self.gate_up = _linear(cfg.dim, 2 * cfg.hidden, cfg, rngs, bias=cfg.mlp_has_bias)
        else:
            self.up = _linear(cfg.dim, cfg.hidden, cfg, rngs, bias=cfg.mlp_has_bias)
        self.down = _linear(cfg.hidden, cfg.dim, cfg, rngs, std=cfg.init_std / (2 * cfg.layers) ** 0.5,
                            bias=cfg.mlp_has_bias)
        self.drop = _dropout(cfg.dropout, rngs)
        self.gated, self.act, self.limit = cfg.mlp_gated, cfg.mlp_act, cfg.mlp_limit

    def __call__(self, x):
        if not self.gated:  # (mlp_act is not gpt_oss here: the config checks)
            return _apply(self.drop, self.down(gated_act(self.up(x), 1.0, self.act)))
        g, u = jnp.split(self.gate_up(x), 2, axis=-1)
        return _apply(self.drop, self.down(gated_act(g, u, self.act, self.limit)))


def _mlp(cfg: GPTConfig, layer: int, rngs: nnx.Rngs) -> nnx.Module:
    """A block's MLP: :class:`SwiGLU`, or with ``moe_experts`` (past ``moe_dense_layers``) a
    :class:`jaxattn.models.moe.MoE` of them."""
    if not cfg.moe_experts or layer < cfg.moe_dense_layers:
        return SwiGLU(cfg, rngs=rngs)
    return MoE(cfg.dim, cfg.expert_hidden, cfg.moe_experts, cfg.moe_top_k, act=cfg.mlp_act, limit=cfg.mlp_limit,
               bias=cfg.mlp_has_bias, renormalize=cfg.moe_renormalize, impl=cfg.moe_impl, dtype=cfg.dtype,
               init_std=cfg.init_std, out_std=cfg.init_std / (2 * cfg.layers) ** 0.5, dropout=cfg.dropout,
               shared_hidden=cfg.moe_shared_dim, shared_gate=cfg.moe_shared_gate, expert_format=cfg.moe_format,
               scoring=cfg.moe_scoring, groups=cfg.moe_groups, topk_groups=cfg.moe_topk_groups,
               score_bias=cfg.moe_score_bias, routed_scale=cfg.moe_routed_scale,
               bias_update_rate=cfg.moe_bias_update_rate, rngs=rngs)


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, layer: int, *, rngs: nnx.Rngs):
        norm = functools.partial(_norm, cfg)
        # before attention, the MLP (Phi's shared_norm: norm1 before both)
        self.norm1 = norm() if cfg.pre_norms else None
        self.norm2 = norm() if cfg.pre_norms and not cfg.shared_norm else None
        # Gemma 2/3: on each branch's output too
        self.attn_post_norm, self.mlp_post_norm = (norm(), norm()) if cfg.post_norms else (None, None)
        self.residual_multiplier, self.parallel, self.post_ln = cfg.residual_multiplier, cfg.parallel_residual, cfg.post_ln
        self.norm_residual = cfg.norm_residual
        scales = cfg.residual_scales or (1.0,) * 6  # (MiniMax's alpha / beta: this layer kind's, and the MLP's)
        lightning = cfg.layer_type(layer) == "lightning"
        self.scales = (*scales[2:4], *scales[4:]) if lightning else (*scales[:2], *scales[4:])
        if cfg.kv_lora_rank and cfg.layer_type(layer) not in RECURRENT_KINDS:  # DeepSeek's multi-head latent attention
            from jaxattn.models.mla import MLAttention

            self.attn = MLAttention(cfg, layer, rngs=rngs)
        elif cfg.layer_type(layer) == "lightning":  # MiniMax-01's lightning attention
            from jaxattn.models.minimax import LightningLayer

            self.attn = LightningLayer(cfg, layer, rngs=rngs)
        elif cfg.layer_type(layer) == "delta":  # Gated DeltaNet
            from jaxattn.models.deltanet import GatedDeltaNetLayer

            self.attn = GatedDeltaNetLayer(cfg, layer, rngs=rngs)
        elif cfg.layer_type(layer) == "kda":  # Kimi Delta Attention
            from jaxattn.models.deltanet import KimiDeltaLayer

            self.attn = KimiDeltaLayer(cfg, layer, rngs=rngs)
        elif cfg.layer_type(layer) == "mamba2":  # Mamba-2 (SSD)
            from jaxattn.models.mamba2 import Mamba2Layer

            self.attn = Mamba2Layer(cfg, layer, rngs=rngs)
        else:
            self.attn = Attention(cfg, layer, rngs=rngs)
        self.mlp = _mlp(cfg, layer, rngs)

    def __call__(self, x, positions, cache: KVCache | None = None, offset: jax.Array | int = 0,
                 segment_ids: jax.Array | None = None, lengths: jax.Array | None = None):
        scale = self.residual_multiplier

        def post(norm, y):
            y = y if norm is None else norm(y)
            return y if scale == 1.0 else y * jnp.asarray(scale, y.dtype)  # (Granite's residual_multiplier)

        h = x if self.post_ln else _apply(self.norm1, x)
        if cache is None:
            a = self.attn(h, positions, segment_ids=segment_ids)
        elif lengths is not None and self.attn.kind in RECURRENT_KINDS:  # (a ragged prefill: states stop at lengths)
            a, cache = self.attn(h, positions, cache, offset, lengths=lengths)
        else:
            a, cache = self.attn(h, positions, cache, offset)
        if self.norm_residual:  # (MiniMax: each residual is the branch's normed input, scaled)
            aa, ab, ma, mb = (jnp.asarray(f, h.dtype) for f in self.scales)
            x = aa * h + ab * a
            h2 = self.norm2(x)
            x = ma * h2 + mb * self.mlp(h2)
        elif self.post_ln:  # (OPT-350m: norms after the residual adds)
            x = self.norm1(x + post(None, a))
            x = self.norm2(x + post(None, self.mlp(x)))
        elif self.parallel:  # (GPT-NeoX: both branches read the block's input; Phi: the same normed input)
            x = x + a + self.mlp(h if self.norm2 is None else self.norm2(x))
        else:
            x = x + post(self.attn_post_norm, a)
            x = x + post(self.mlp_post_norm, self.mlp(_apply(self.norm2, x)))
        return x if cache is None else (x, cache)


def check_segment_ids(segment_ids: jax.Array, tokens: jax.Array) -> jax.Array:
    """``segment_ids`` checked against ``tokens [batch, seq]``: the same shape, an integer dtype."""
    if tuple(segment_ids.shape) != tuple(tokens.shape) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be int [batch, seq] = {tuple(tokens.shape)} like tokens, got "
                         f"{jnp.dtype(segment_ids.dtype).name} {tuple(segment_ids.shape)}")
    return segment_ids


def token_positions(n: int, offset: jax.Array | int) -> jax.Array:
    """Positions ``offset .. offset + n - 1``: ``[n]``, or ``[B, n]`` for a per-row ``offset [B]``."""
    if isinstance(offset, int) or jnp.ndim(offset) == 0:
        return jnp.arange(n) + offset
    return jnp.arange(n) + offset[:, None]


def document_positions(docs: jax.Array) -> jax.Array:
    """``[B, N]`` positions counted from 0 at each document's first token (``docs``: document indices)."""
    t = jnp.arange(docs.shape[1])
    first = jnp.concatenate([jnp.ones_like(docs[:, :1], bool), docs[:, 1:] != docs[:, :-1]], 1)
    return t - jax.lax.cummax(jnp.where(first, t, 0), axis=1)


def _kv_cache(cfg: GPTConfig, batch: int, max_len: int, dtype: str | None) -> KVCache:
    """One layer's zeroed (k, v) cache ``[batch, max_len, kv_heads, head_dim]``, with per-kv-head scales (set
    by the prefill) for a quantized one."""
    kv = cfg.kv_heads or cfg.heads
    shape = (batch, max_len, kv, cfg.head_size)
    dt = jnp.dtype(dtype or cfg.kv_cache_dtype or cfg.dtype)
    if dt in map(jnp.dtype, ("float8_e4m3fn", "float8_e5m2", "int8")):
        return jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.ones(kv), jnp.ones(kv)
    return jnp.zeros(shape, dt), jnp.zeros(shape, dt)


class GPT(nnx.Module):
    """``model(tokens [B, N]) -> logits [B, N, vocab]`` (fp32)."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        width = cfg.embed_dim or cfg.dim  # (OPT-350m: narrower embeddings, projected in and out)
        self.embed = nnx.Embed(cfg.vocab_size, width, embedding_init=nnx.initializers.normal(cfg.init_std),
                               rngs=rngs)
        self.project_in, self.project_out = ((_linear(width, cfg.dim, cfg, rngs), _linear(cfg.dim, width, cfg, rngs))
                                             if width != cfg.dim else (None, None))
        self.pos_embed = nnx.Embed(cfg.max_positions + cfg.position_offset, cfg.dim,
                                   embedding_init=nnx.initializers.normal(cfg.init_std),
                                   rngs=rngs) if cfg.position == "learned" else None
        self.embed_norm = _norm(cfg) if cfg.embed_norm else None
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.layers)])
        self.norm = None if cfg.post_ln else _norm(cfg)  # (post-LN blocks end normed)
        self.head = None if cfg.tie_embeddings else _linear(width, cfg.vocab_size, cfg, rngs, bias=cfg.head_bias)
        self.embed_drop = _dropout(cfg.dropout, rngs)
        # mixtures of experts: the training loss adds this times the layers' mean load-balance loss
        # (jaxattn.train.loop.forward_with_aux_loss)
        self.aux_loss_weight = cfg.moe_aux_loss if cfg.moe_experts else None

    @property
    def block_sparse_kinds(self) -> list[str]:
        """The layer kinds run on the block-sparse kernel (not full or sliding-window attention)."""
        return sorted({blk.attn.kind for blk in self.blocks} - {"full", "window", *RECURRENT_KINDS})

    def enable_sequence_parallel(self, mesh, axis: str = "seq", batch_axis: str | None = None,
                                 layout: Literal["contiguous", "zigzag"] = "contiguous") -> None:
        """Runs every attention layer as ring attention with the sequence split over ``mesh`` axis
        ``axis`` (:func:`jaxattn.ring_attention_sp`; the batch over ``batch_axis``); XLA partitions
        the other layers from the input sharding. Full and sliding-window layers can (with ALiBi and
        soft caps: the ring passes every hop its global positions, and a window skips the hops it cannot
        see), and multi-head latent attention (over its expanded heads), not block-sparse or quantized ones;
        the recurrent layers run sequence parallel too
        (Gated DeltaNet / Kimi Delta: :func:`jaxattn.gated_delta_rule_sp`; Mamba-2:
        :func:`jaxattn.gated_linear_attention_sp`; MiniMax's lightning layers: :func:`jaxattn.lightning_attention_sp`;
        contiguous shards). ``mesh=None`` turns it off.

        ``layout="zigzag"`` balances the causal work over the devices: the forward permutes its tokens
        (and their RoPE positions) into :func:`jaxattn.zigzag_permutation` order once, every layer runs
        the zig-zag ring on them, and the hidden states return to natural order before the head (one
        shard exchange); the sequence length must divide by twice the ``axis`` size. Same logits; with
        dropout, the embedding and residual masks are drawn in the permuted order (the attention
        dropout's is the single-device mask either way)."""
        from jaxattn.ops.ring_attention import check_layout

        check_layout(layout)
        if mesh is not None:
            bad = sorted({blk.attn.kind for blk in self.blocks} - {"full", "window", *RECURRENT_KINDS})
            if layout != "contiguous" and set(RECURRENT_KINDS) & set(self.cfg.layer_types):
                raise ValueError(f"layout={layout!r}: the recurrent layers (MiniMax's lightning, Gated DeltaNet, "
                                 f"Kimi Delta, Mamba-2) run their shards in order; use layout='contiguous'")
            if bad or self.cfg.quantized:
                raise ValueError(f"sequence parallelism covers full and sliding-window attention and the recurrent "
                                 f"layers; this model has {bad or 'quantized'} layers")
        from jaxattn.ops._spmd import layer_setting

        setting = layer_setting(mesh, axis, batch_axis)
        for blk in self.blocks:
            blk.attn.sequence_parallel = None if setting is None else (*setting, layout)

    def __call__(self, tokens: jax.Array, *, cache: list[KVCache] | None = None,
                 offset: jax.Array | int = 0, segment_ids: jax.Array | None = None,
                 lengths: jax.Array | None = None):
        """Logits ``[B, n, vocab]`` of ``tokens [B, n]``. With a ``cache`` (``init_cache``), the
        tokens sit at positions ``offset ..`` and their keys/values are written into it:
        returns ``(logits, cache)``; ``offset`` may be int32 ``[B]`` (each row at its own position: ragged
        prompts in :func:`jaxattn.models.generate`). ``segment_ids`` int ``[B, n]`` (training, scoring; no cache):
        packed documents, runs of equal ids; each attends only within itself from position 0, so its
        logits are those of the document alone. ``lengths`` int ``[B]`` (a ragged prefill: a cache at offset 0):
        row ``b``'s prompt is its first ``lengths[b]`` tokens; the recurrent layers' states and convolution
        histories stop there (their pads leave them as they are)."""
        if lengths is not None and (cache is None or not isinstance(offset, int) or offset != 0):
            raise ValueError("lengths (a ragged prefill) needs a cache at offset 0")
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must have shape [batch, seq] and an integer dtype, got "
                             f"{jnp.dtype(tokens.dtype).name} {tuple(tokens.shape)}")
        dt = jnp.dtype(self.cfg.dtype)
        positions = token_positions(tokens.shape[1], offset)  # [(B,) n]
        if positions.ndim == 2 and self.block_sparse_kinds:
            raise ValueError("per-row positions (ragged prompts) decode full and sliding-window layers; this model "
                             "has block-sparse ones")
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed documents) are for the forward without a cache")
            segment_ids = document_index(check_segment_ids(segment_ids, tokens))  # (runs, as TNL's)
            positions = document_positions(segment_ids)
        sp = self.blocks[0].attn.sequence_parallel if len(self.blocks) else None
        zigzag = cache is None and sp is not None and sp[3] == "zigzag"
        if zigzag:  # the tokens in zig-zag order (a gather of the small token array), restored before the head
            from jaxattn.ops.ring_attention import zigzag_permutation

            perm = zigzag_permutation(tokens.shape[1], sp[0].shape[sp[1]])
            tokens, positions = tokens[:, perm], positions[..., perm]
            if segment_ids is not None:
                segment_ids = segment_ids[:, perm]
        x = self.embed(tokens).astype(dt)
        if self.cfg.embed_scale:  # Gemma: sqrt(dim) in the compute dtype, as Hugging Face's
            x = x * jnp.asarray(self.cfg.dim ** 0.5, dt)
        if self.cfg.embed_multiplier != 1.0:  # Granite
            x = x * jnp.asarray(self.cfg.embed_multiplier, dt)
        x = _apply(self.project_in, x)  # (OPT-350m)
        if self.pos_embed is not None:  # GPT-2's learned positions
            if tokens.shape[1] > self.cfg.max_positions:
                raise ValueError(f"tokens: {tokens.shape[1]} positions, past the model's learned {self.cfg.max_positions}")
            x = x + self.pos_embed(positions + self.cfg.position_offset).astype(dt)
        x = _apply(self.embed_norm, x)  # (BLOOM)
        x = _apply(self.embed_drop, x)
        new_cache = []
        run = remat_blocks(self.cfg.remat and cache is None, lambda blk, x: blk(x, positions, segment_ids=segment_ids))
        for i, blk in enumerate(self.blocks):
            if cache is None:
                x = run(blk, x)
            else:
                x, c = blk(x, positions, cache[i], offset, lengths=lengths)
                new_cache.append(c)
        if zigzag:
            from jaxattn.ops.ring_attention import zigzag_sp

            x = zigzag_sp(x, mesh=sp[0], axis=sp[1], batch_axis=sp[2], inverse=True)
        x = _apply(self.project_out, _apply(self.norm, x))
        if self.head is None:
            logits = jnp.einsum("bnd,vd->bnv", x.astype(jnp.float32), self.embed.embedding[...])
        else:
            logits = self.head(x).astype(jnp.float32)
        if self.cfg.logits_divisor != 1.0:  # Granite's logits_scaling
            logits = logits / self.cfg.logits_divisor
        if self.cfg.final_softcap is not None:  # Gemma 2
            logits = self.cfg.final_softcap * jnp.tanh(logits / self.cfg.final_softcap)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch: int, max_len: int, dtype: str | None = None) -> list[KVCache]:
        """Zeroed (k, v) caches ``[batch, max_len, kv_heads, head_dim]`` per layer (compute dtype, or
        ``cfg.kv_cache_dtype`` with per-kv-head scales that the prefill sets); an MLA model's latent caches;
        a lightning layer's ``(state,)``, a Gated DeltaNet, Kimi Delta or Mamba-2 layer's ``(state, convolution
        history)``."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"init_cache needs batch >= 1 and max_len >= 1, got {batch}, {max_len}")
        if self.cfg.position == "learned" and max_len > self.cfg.max_positions:
            raise ValueError(f"max_len {max_len}: the model's learned positions end at {self.cfg.max_positions}")
        width = self.cfg.kv_lora_rank + self.cfg.qk_rope_dim  # (multi-head latent attention: the latent and the
        latent = (jnp.zeros((batch, max_len, 1, width), jnp.dtype(dtype or self.cfg.dtype)),)  # shared RoPE key)
        hd, h = self.cfg.head_size, self.cfg.heads
        state = jnp.zeros((batch, h, hd, hd), jnp.float32)  # (lightning layers: a recurrent state)
        dh, dhk, dk, dv = self.cfg.delta_dims  # (Gated DeltaNet: its state and its convolution's last inputs)
        delta = (jnp.zeros((batch, dh, dk, dv), jnp.float32),
                 jnp.zeros((batch, self.cfg.delta_conv - 1, 2 * dhk * dk + dh * dv), jnp.dtype(self.cfg.dtype)))
        kinds = {"lightning": (state,), "delta": delta, "kda": delta, "mamba2": delta}
        return [kinds[blk.attn.kind] if blk.attn.kind in kinds else latent if self.cfg.kv_lora_rank
                else _kv_cache(self.cfg, batch, max_len, dtype) for blk in self.blocks]

    def prefill(self, tokens: jax.Array, max_len: int, lengths: jax.Array | None = None):
        """The prompt's parallel forward into a fresh cache of ``max_len`` positions:
        ``(last logits [B, vocab], cache)`` (for :func:`jaxattn.models.generate`). ``lengths`` int ``[B]``:
        ragged prompts, each row's first ``lengths[b]`` tokens (right padding: the pads' cache entries lie
        past the row's length, so decoding at per-row positions overwrites them and never reads them)."""
        if tokens.shape[1] > max_len:
            raise ValueError(f"prompt of {tokens.shape[1]} tokens does not fit max_len={max_len}")
        if lengths is not None and self.block_sparse_kinds:
            raise ValueError("ragged prompts (lengths) decode full, sliding-window and recurrent layers; this model "
                             "has block-sparse ones")
        logits, cache = self(tokens, cache=self.init_cache(tokens.shape[0], max_len), offset=0,
                             lengths=None if lengths is None else jnp.asarray(lengths, jnp.int32))
        if lengths is None:
            return logits[:, -1], cache
        return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0], cache

    def decode_step(self, token: jax.Array, cache: list[KVCache], position: jax.Array):
        """One token ``[B]`` at ``position`` (int32, or ``[B]``: per row) against the cache:
        ``(logits [B, vocab], cache)``."""
        logits, cache = self(token[:, None], cache=cache, offset=position)
        return logits[:, 0], cache

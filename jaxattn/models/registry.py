"""Named model configurations and a factory: ``create_model("tnl-tiny", rngs=nnx.Rngs(0))``."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from jaxattn.models.eva import EVA_CONFIGS, Eva, EvaConfig
from jaxattn.models.halonet import HALONET_CONFIGS, HaloNet, HaloNetConfig
from jaxattn.models.gpt import GPT, GPTConfig, yarn_mscale
from jaxattn.models.landmark import LandmarkGPT, LandmarkGPTConfig
from jaxattn.models.l2vit import L2VIT_CONFIGS, L2ViT, L2ViTConfig
from jaxattn.models.moh import MOH_VIT_CONFIGS, MoHViT, MoHViTConfig
from jaxattn.models.sparsifiner import SPARSIFINER_CONFIGS, Sparsifiner, SparsifinerConfig
from jaxattn.models.tnl import TNL, TNLConfig
from jaxattn.models.vit import VIT_CONFIGS, ViT, ViTConfig

# GPT-2's block: LayerNorms (eps 1e-5), biases, a tanh-GELU MLP, 1024 learned positions
_GPT2_BLOCK = dict(position="learned", max_positions=1024, norm="layer", norm_eps=1e-5, bias=True, mlp_gated=False,
                   mlp_act="gelu_tanh")

# gpt-oss's block: biases on q, k, v, o, the router and the experts; attention sinks; the clamped GLU
_GPT_OSS_BLOCK = dict(bias=True, attn_sinks=True, mlp_act="gpt_oss", tie_embeddings=False)
_GPT_OSS_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096}

# DeepSeek-V3's mixture of experts: sigmoid routing with the selection bias, top-k within the best groups,
# renormalized weights times 2.5, one ungated shared expert, dense first layers
_DEEPSEEK_V3_MOE = dict(moe_scoring="sigmoid", moe_score_bias=True, moe_renormalize=True, moe_routed_scale=2.5,
                        moe_shared_gate=False, tie_embeddings=False)


_QWEN3_NEXT_BLOCK: dict[str, Any] = dict(layer_types=("delta", "delta", "delta", "full"), qk_norm=True, norm_offset=1.0,
                                         attn_output_gate=True, tie_embeddings=False)


def _deepseek_yarn(mscale: float) -> dict[str, Any]:
    """DeepSeek's YaRN (factor 40 over 4096 tokens) and the softmax scale it implies for 192-wide q/k heads."""
    yarn = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
            "beta_slow": 1.0, "mscale": mscale, "mscale_all_dim": mscale}
    return dict(rope_scaling=yarn, attn_scale=192 ** -0.5 * yarn_mscale(40.0, mscale) ** 2)


MODEL_CONFIGS: dict[str, Any] = {
    # CPU-sized, for tests and the README's main job.
    "tnl-tiny": TNLConfig(vocab_size=256, dim=128, layers=4, heads=4, glu_dim=256),
    # TransNormerLLM paper sizes (vocab of the released tokenizer). The LM head is tied to the embedding,
    # as in the reference TransnormerForCausalLM (Hugging Face's tie_word_embeddings default); released
    # checkpoints load with jaxattn.models.hf.load_pretrained, which reads their own config.json.
    "tnl-385m": TNLConfig(vocab_size=64000, dim=1024, layers=24, heads=8, glu_dim=2816, tie_embeddings=True),
    "tnl-1b": TNLConfig(vocab_size=64000, dim=2048, layers=16, heads=16, glu_dim=5632, tie_embeddings=True),
    # 7B: 4096/30/32 as the released config is read; glu 11008 UNCONFIRMED.
    "tnl-7b": TNLConfig(vocab_size=64000, dim=4096, layers=30, heads=32, glu_dim=11008, tie_embeddings=True),
    # HaloNet: halonet-tiny, halonet-h0..h7 (paper), halonet26t / sehalonet33ts (timm); see halonet.py.
    **HALONET_CONFIGS,
    # GPT-style decoders (byte-level, CPU-sized): full attention, and a PowerAttention hybrid
    # (three PowerAttention layers per full-attention layer; B = 16, W = 64, sink 16 tokens).
    "gpt-tiny": GPTConfig(vocab_size=256, dim=128, layers=4, heads=4),
    "alibi-gpt-tiny": GPTConfig(vocab_size=256, dim=128, layers=4, heads=4, position="alibi"),  # ALiBi, no RoPE
    # gpt-oss's block, byte-level and CPU-sized: sliding-window and full layers alternating, GQA, attention
    # sinks, biases, 8 experts (top 2) with its clamped GLU, an untied head
    "gpt-oss-tiny": GPTConfig(vocab_size=256, dim=128, layers=4, heads=4, kv_heads=2, layer_types=("window", "full"),
                              window=64, **_GPT_OSS_BLOCK, moe_experts=8, moe_top_k=2, mlp_dim=128),
    # gpt-oss-20b / -120b as released (openai/gpt-oss-*: o200k_harmony vocabulary, YaRN to 131072 tokens); the
    # released folders load with jaxattn.models.hf.load_pretrained (their MXFP4 experts dequantized, or kept
    # packed with moe_format="mxfp4": 120b then fits one 80 GB GPU)
    "gpt-oss-20b": GPTConfig(vocab_size=201088, dim=2880, layers=24, heads=64, kv_heads=8, head_dim=64, mlp_dim=2880,
                             layer_types=("window", "full"), window=128, **_GPT_OSS_BLOCK, moe_experts=32, moe_top_k=4,
                             rope_theta=150000.0, rope_scaling=_GPT_OSS_YARN, norm_eps=1e-5),
    "gpt-oss-120b": GPTConfig(vocab_size=201088, dim=2880, layers=36, heads=64, kv_heads=8, head_dim=64, mlp_dim=2880,
                              layer_types=("window", "full"), window=128, **_GPT_OSS_BLOCK, moe_experts=128, moe_top_k=4,
                              rope_theta=150000.0, rope_scaling=_GPT_OSS_YARN, norm_eps=1e-5),
    # DeepSeek-V3's architecture, byte-level and CPU-sized: multi-head latent attention (a 64-wide latent, a
    # 48-wide query bottleneck, 16-wide RoPE keys) and its mixture of experts (8 experts in 4 groups, top 2
    # of the best 2 groups, sigmoid routing, a shared expert, auxiliary-loss-free balancing) after one dense layer
    "deepseek-tiny": GPTConfig(vocab_size=256, dim=128, layers=4, heads=4, head_dim=32, qk_rope_dim=16, v_head_dim=32,
                               kv_lora_rank=64, q_lora_rank=48, mlp_dim=256, moe_experts=8, moe_top_k=2, moe_dim=64,
                               moe_dense_layers=1, moe_shared_dim=64, moe_groups=4, moe_topk_groups=2,
                               moe_bias_update_rate=0.001, **_DEEPSEEK_V3_MOE),
    # DeepSeek-V2-Lite (16B, 2.4B active) and DeepSeek-V3 / R1 (671B, 37B active) as released (their folders
    # load with jaxattn.models.hf.load_pretrained; V3's FP8 weights dequantized as they load)
    "deepseek-v2-lite": GPTConfig(vocab_size=102400, dim=2048, layers=27, heads=16, head_dim=128, qk_rope_dim=64,
                                  v_head_dim=128, kv_lora_rank=512, mlp_dim=10944, moe_experts=64, moe_top_k=6,
                                  moe_dim=1408, moe_dense_layers=1, moe_shared_dim=2 * 1408, moe_shared_gate=False,
                                  moe_renormalize=False, moe_aux_loss=0.001, tie_embeddings=False,
                                  **_deepseek_yarn(0.707)),
    "deepseek-v3": GPTConfig(vocab_size=129280, dim=7168, layers=61, heads=128, head_dim=128, qk_rope_dim=64,
                             v_head_dim=128, kv_lora_rank=512, q_lora_rank=1536, mlp_dim=18432, moe_experts=256,
                             moe_top_k=8, moe_dim=2048, moe_dense_layers=3, moe_shared_dim=2048, moe_groups=8,
                             moe_topk_groups=4, moe_aux_loss=0.001, **_DEEPSEEK_V3_MOE, **_deepseek_yarn(1.0)),
    # MiniMax-01's architecture, byte-level and CPU-sized: three lightning layers (Lightning Attention-2 with
    # MiniMax's decay schedule, jaxattn.models.minimax) to one softmax layer, scaled normed residuals
    # (DeepNorm's alpha = (2 L) ** 0.25), 8 experts (top 2) in every layer
    "minimax-tiny": GPTConfig(vocab_size=256, dim=128, layers=4, heads=4, kv_heads=2, mlp_dim=128,
                              layer_types=("lightning", "lightning", "lightning", "full"), norm_residual=True,
                              residual_scales=(8 ** 0.25, 1.0, 8 ** 0.25, 1.0, 8 ** 0.25, 1.0), moe_experts=8,
                              moe_top_k=2, norm_eps=1e-5, tie_embeddings=False),
    # MiniMax-Text-01 (456B, 45.9B active) as its config.json reads (UNCONFIRMED here: no checkpoint was read);
    # its folders load with jaxattn.models.hf.load_pretrained
    "minimax-text-01": GPTConfig(vocab_size=200064, dim=6144, layers=80, heads=64, kv_heads=8, head_dim=128,
                                 mlp_dim=9216, layer_types=("lightning",) * 7 + ("full",), rope_theta=1e7,
                                 rotary_dim=64, norm_residual=True, residual_scales=(160 ** 0.25, 1.0) * 3,
                                 moe_experts=32, moe_top_k=2, moe_aux_loss=0.001, norm_eps=1e-5,
                                 tie_embeddings=False),
    # Gated DeltaNet hybrid, byte-level and CPU-sized: three Gated DeltaNet layers (jaxattn.models.deltanet) to one
    # softmax attention layer
    "deltanet-tiny": GPTConfig(vocab_size=256, dim=128, layers=4, heads=4, layer_types=("delta", "delta", "delta", "full")),
    # Qwen3-Next's architecture, byte-level and CPU-sized: three Gated DeltaNet layers (q / k heads shared by two
    # value heads) to one gated softmax layer (per-head q / k norms, partial RoPE, a sigmoid output gate),
    # zero-centred RMSNorms, 8 experts (top 2, renormalized) beside a sigmoid-gated shared expert
    "qwen3-next-tiny": GPTConfig(**_QWEN3_NEXT_BLOCK, vocab_size=256, dim=128, layers=4, heads=4, kv_heads=2,
                                 head_dim=64, rotary_dim=16, delta_heads=4, delta_key_heads=2, delta_head_dim=32,
                                 moe_experts=8, moe_top_k=2, mlp_dim=64, moe_shared_dim=64),
    # Qwen3-Next-80B-A3B (80B, 3B active) as its config.json reads (from memory: no checkpoint was read; its 79.8B
    # parameters match the model card, tests/test_qwen3_next.py); its
    # folders load with jaxattn.models.hf.load_pretrained (jaxattn.models.qwen3_next_hf)
    "qwen3-next-80b-a3b": GPTConfig(**_QWEN3_NEXT_BLOCK, vocab_size=151936, dim=2048, layers=48, heads=16, kv_heads=2,
                                    head_dim=256, rotary_dim=64, rope_theta=1e7, delta_heads=32, delta_key_heads=16,
                                    delta_head_dim=128, moe_experts=512, moe_top_k=10, mlp_dim=512, moe_shared_dim=512,
                                    moe_aux_loss=0.001),
    # Kimi Delta Attention hybrid, byte-level and CPU-sized: three KDA layers (the gated delta rule with a decay per key
    # channel, jaxattn.models.deltanet.KimiDeltaLayer) to one softmax layer
    "kda-tiny": GPTConfig(vocab_size=256, dim=128, layers=4, heads=4, layer_types=("kda", "kda", "kda", "full")),
    # Mamba-2 layers (SSD, on the gated linear attention kernels) with one softmax layer, as hybrid stacks do:
    # 4 heads of 64 (expand 2), one group, a 64-wide state
    "mamba2-tiny": GPTConfig(vocab_size=256, dim=128, layers=4, heads=4, layer_types=("mamba2", "mamba2", "mamba2", "full"),
                             delta_heads=4, delta_key_heads=1, delta_head_dim=64, delta_value_dim=64),
    # Kimi Linear's architecture, byte-level and CPU-sized: three KDA layers to one multi-head latent attention layer
    # without positional encoding, DeepSeek-V3's experts after one dense layer (its folders load with
    # jaxattn.models.hf.load_pretrained: jaxattn.models.kimi_linear_hf)
    "kimi-linear-tiny": GPTConfig(vocab_size=256, dim=128, layers=4, heads=4, head_dim=32, qk_rope_dim=16,
                                  v_head_dim=32, kv_lora_rank=64, rope_layers=(False,), mlp_dim=256,
                                  layer_types=("kda", "kda", "kda", "full"), delta_head_dim=32, moe_experts=8,
                                  moe_top_k=2, moe_dim=64, moe_dense_layers=1, moe_shared_dim=64,
                                  moe_bias_update_rate=0.001, **_DEEPSEEK_V3_MOE),
    # Kimi-Linear-48B-A3B (48B, 3B active) as its config.json reads (UNCONFIRMED here: no checkpoint was read;
    # tests/test_kimi_linear.py checks it against the config through jaxattn.models.kimi_linear_hf and its parameter
    # count): 20 KDA layers, multi-head latent attention without positions at layers 4, 8, ..., 24 and 27 (1-indexed),
    # 256 experts (top 8) after one dense layer
    "kimi-linear-48b-a3b": GPTConfig(vocab_size=163840, dim=2304, layers=27, heads=32, head_dim=128, qk_rope_dim=64,
                                     v_head_dim=128, kv_lora_rank=512, rope_layers=(False,), mlp_dim=9216,
                                     layer_types=tuple("full" if i in (3, 7, 11, 15, 19, 23, 26) else "kda"
                                                       for i in range(27)),
                                     delta_heads=32, delta_head_dim=128, moe_experts=256, moe_top_k=8, moe_dim=1024,
                                     moe_dense_layers=1, moe_shared_dim=1024, moe_bias_update_rate=0.001,
                                     norm_eps=1e-5, **{**_DEEPSEEK_V3_MOE, "moe_routed_scale": 2.446}),
    # a Mixtral-style mixture of experts (LLaMA blocks, 8 SiLU experts, top 2), byte-level and CPU-sized
    "moe-gpt-tiny": GPTConfig(vocab_size=256, dim=128, layers=4, heads=4, moe_experts=8, moe_top_k=2, mlp_dim=128),
    # GPT-2's block (LayerNorm, biases, GELU MLP, learned positions): byte-level CPU-sized, and GPT-2 small
    # (124M, its 50257-token vocabulary: nanoGPT's train.bin / val.bin token files); GPT-2 / Pythia folders load too
    "gpt2-tiny": GPTConfig(vocab_size=256, dim=128, layers=4, heads=4, **_GPT2_BLOCK),
    "gpt2-124m": GPTConfig(vocab_size=50257, dim=768, layers=12, heads=12, **_GPT2_BLOCK),
    # Landmark attention (byte-level + 1 landmark token; a landmark after every 31 bytes).
    "landmark-gpt-tiny": LandmarkGPTConfig(vocab_size=257, landmark_id=256, dim=128, layers=4, heads=4,
                                           mem_freq=31, top_k=4),
    "power-gpt-tiny": GPTConfig(vocab_size=256, dim=128, layers=4, heads=4,
                                layer_types=("power", "power", "power", "full"), sparse_block=16, window=64,
                                sink=16),
    # ViT: vit-tiny (CPU, 32x32 grey digits), vit-ti16 / vit-s16 / vit-b16 (paper / timm); see vit.py.
    **VIT_CONFIGS,
    # EVA-02: rotary attention, SwiGLU MLP (eva02-tiny: CPU-sized; timm's EVA-02 folders load); see eva.py.
    **EVA_CONFIGS,
    # Sparsifiner: vit-tiny with a learned top-k connectivity predictor; see sparsifiner.py.
    **SPARSIFINER_CONFIGS,
    # MoH-ViT: ViT with Mixture-of-Head attention: moh-vit-tiny (CPU), moh-vit-s / moh-vit-b; see moh.py.
    **MOH_VIT_CONFIGS,
    # L2ViT: l2vit-mini (CPU, 32x32 grey digits), l2vit-t / -s / -b (paper); see l2vit.py.
    **L2VIT_CONFIGS,
}


def models_of_kind(kind: str) -> list[str]:
    """Registered names of one kind: ``"lm"`` (token models, with a ``vocab_size``) or ``"image"``."""
    if kind not in ("lm", "image"):
        raise ValueError(f"kind must be 'lm' or 'image', got {kind!r}")
    return sorted(n for n, c in MODEL_CONFIGS.items() if hasattr(c, "vocab_size") == (kind == "lm"))


def _folder_type(name: str) -> str | None:
    """The ``model_type`` when ``name`` is a Hugging Face / timm folder jaxattn converts, else None."""
    from jaxattn.models import hf

    return hf.hf_model_type(name)


def timm_architecture(name: str) -> Any:
    """The :class:`ViTConfig` of a timm ViT architecture name (``vit_base_patch16_siglip_224``,
    ``deit3_small_patch16_224``, ...; a ``.tag`` is ignored) as ``timm.create_model(name)`` builds it; None when
    ``name`` is not one (:func:`jaxattn.models.timm_hub.is_architecture`)."""
    from jaxattn.models.timm_hub import config_from_hf, is_architecture

    return config_from_hf({"architecture": name}) if is_architecture(name) else None


def model_config(name: str) -> Any:
    """The config of a registered model, of the model in a Hugging Face / timm folder, or of a timm ViT
    architecture name; None for none of them."""
    if name in MODEL_CONFIGS:
        return MODEL_CONFIGS[name]
    if _folder_type(name) is None:
        return timm_architecture(name)
    from jaxattn.models import hf

    return hf.read_config(name)


def check_model_kind(name: str, kind: str) -> None:
    """A ValueError naming what ``name`` is when it is not a model of ``kind`` (the task ``lm`` or
    ``image``): a registered name or a Hugging Face / timm folder; the error lists the task's models."""
    folder = _folder_type(name)
    from jaxattn.models.timm_hub import is_architecture

    known = folder or name in MODEL_CONFIGS or is_architecture(name)
    is_lm = hasattr(model_config(name), "vocab_size") if known else None
    if is_lm == (kind == "lm"):
        return
    if folder:
        what = "a timm image model" if folder == "timm" else f"a {folder} language model"
    else:
        what = ("an image model" if kind == "lm" else "a language model") if known \
            else "not a registered model, a timm ViT architecture or a Hugging Face folder"
    raise ValueError(f"--model {name!r} is {what}; `{kind}` trains one of {models_of_kind(kind)} (or a folder)")


def create_model(name: str, *, rngs: nnx.Rngs, **overrides: Any) -> nnx.Module:
    """Builds a registered model or a timm ViT architecture (``vit_so400m_patch14_siglip_384``: fresh weights),
    or loads the pretrained one of a Hugging Face / timm folder (:func:`jaxattn.models.hf.load_pretrained`);
    ``overrides`` replace config fields (e.g. ``vocab_size=256``; None: keep the config's)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if name not in MODEL_CONFIGS and _folder_type(name) is not None:
        from jaxattn.models import hf

        return hf.load_pretrained(name, **overrides)
    cfg = MODEL_CONFIGS.get(name) or timm_architecture(name)
    if cfg is None:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_CONFIGS)}, a timm ViT architecture "
                         "(e.g. vit_base_patch16_224) or a Hugging Face folder")
    try:
        cfg = dataclasses.replace(cfg, **overrides)
    except TypeError as e:
        raise ValueError(f"bad override for {name!r}: {e}") from None
    if isinstance(cfg, TNLConfig):
        return TNL(cfg, rngs=rngs)
    if isinstance(cfg, LandmarkGPTConfig):  # before GPTConfig, its base class
        return LandmarkGPT(cfg, rngs=rngs)
    if isinstance(cfg, GPTConfig):
        return GPT(cfg, rngs=rngs)
    if isinstance(cfg, HaloNetConfig):
        return HaloNet(cfg, rngs=rngs)
    if isinstance(cfg, MoHViTConfig):  # before ViTConfig: it is a subclass
        return MoHViT(cfg, rngs=rngs)
    if isinstance(cfg, EvaConfig):  # before ViTConfig: it is a subclass
        return Eva(cfg, rngs=rngs)
    if isinstance(cfg, SparsifinerConfig):  # before ViTConfig: it is a subclass
        return Sparsifiner(cfg, rngs=rngs)
    if isinstance(cfg, ViTConfig):
        return ViT(cfg, rngs=rngs)
    if isinstance(cfg, L2ViTConfig):
        return L2ViT(cfg, rngs=rngs)
    raise ValueError(f"no builder for config type {type(cfg).__name__}")

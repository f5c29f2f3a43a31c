"""Parity with timm's PyTorch HaloNet (optional: needs torch and timm, which are no project
dependencies). timm modules get random weights (and random BatchNorm statistics), the weights are
copied with ``load_timm_state_dict`` and the outputs compared in fp32."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
try:
    timm = pytest.importorskip("timm")
    from timm.layers.halo_attn import HaloAttn as TimmHaloAttn
except pytest.skip.Exception:
    raise
except Exception as e:  # e.g. a torchvision build that does not match torch
    pytest.skip(f"timm is installed but does not import: {e}", allow_module_level=True)

from jaxattn.models import create_model  # noqa: E402
from jaxattn.models.halonet import HaloAttn, load_timm_state_dict, param_count, to_timm_state_dict  # noqa: E402


def _randomize(module, seed: int):
    """Random weights everywhere, BatchNorm statistics and affine included (zero-init would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype != torch.float32:
                continue
            if t.ndim > 1:  # conv / linear / relative embeddings: O(1) activations
                t.copy_(torch.randn(t.shape, generator=g) * t[0].numel() ** -0.5)
            elif name.endswith(("running_var", "weight")):  # BatchNorm scale and variance
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:  # biases, running means
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return module


def _sd(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("stride,scale_pos_embed,avg_down,qkv_bias,impl", [
    (1, False, False, False, "xla"),
    (1, True, False, True, "xla"),
    (2, False, False, False, "xla"),
    (2, True, False, False, "xla"),
    (2, False, True, True, "xla"),  # average-pooled downsampling
    (1, False, False, True, "pallas"),  # the kernel (interpret mode without a GPU)
    (2, True, False, False, "pallas"),
])
def test_halo_attn_matches_timm(stride, scale_pos_embed, avg_down, qkv_bias, impl):
    dim, hw, kw = 16, 16, dict(num_heads=2, block_size=4, halo_size=1)
    ref = _randomize(TimmHaloAttn(dim, 24, stride=stride, scale_pos_embed=scale_pos_embed, avg_down=avg_down,
                                  qkv_bias=qkv_bias, **kw), 0).eval()
    ours = HaloAttn(dim, 24, stride=stride, scale_pos_embed=scale_pos_embed, avg_down=avg_down,
                    qkv_bias=qkv_bias, impl=impl, **kw, rngs=nnx.Rngs(0))
    load_timm_state_dict(ours, _sd(ref))
    x = np.random.default_rng(1).standard_normal((2, hw, hw, dim)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    got = np.asarray(ours(jnp.asarray(x)))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    # and back: our layout converts to timm's keys and shapes exactly
    back = to_timm_state_dict(ours)
    assert set(back) == set(_sd(ref))
    for k, v in _sd(ref).items():
        np.testing.assert_array_equal(back[k], v)


@pytest.mark.parametrize("name,timm_name,image", [("halonet26t", "halonet26t", 256),
                                                  ("sehalonet33ts", "sehalonet33ts", 256)])
def test_full_model_matches_timm(name, timm_name, image):
    """Whole network, eval mode, timm's layout and weights (random), at timm's 256 px."""
    ref = _randomize(timm.create_model(timm_name, num_classes=7), 0).eval()
    ours = create_model(name, rngs=nnx.Rngs(0), num_classes=7, attn_impl="xla")
    assert param_count(ours) == sum(p.numel() for p in ref.parameters())
    load_timm_state_dict(ours, _sd(ref))
    ours.eval()
    x = np.random.default_rng(2).standard_normal((1, image, image, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    got = np.asarray(nnx.jit(lambda m, v: m(v))(ours, jnp.asarray(x)))
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= 1e-4 * scale, np.abs(got - want).max()

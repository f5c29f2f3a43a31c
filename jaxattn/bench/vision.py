"""Vision model throughput: images/s of one jitted AdamW training step (e.g. HaloNet-H0, ViT-S)
and of inference with and without ``quantized=True`` (SageAttention2-style attention), with the
top-1 agreement between the two on the same random weights and inputs."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxattn.bench.runner import adamw_train_step
from jaxattn.models import create_model


def _median_ms(fn: Callable[[], object], steps: int, warmup: int) -> float:
    for _ in range(max(1, warmup)):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def _images(model, batch: int, image_size: int | None):
    size = image_size or model.cfg.image_size
    return jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, model.cfg.in_channels), jnp.float32)


def image_train_step(name: str, *, dtype: str, attn_impl: str = "auto", abstract: bool = False):
    """``(model, step, state)``: one AdamW step of softmax cross-entropy on an image classifier,
    ``step(state, images [B, H, W, C] fp32, labels [B]) -> (state, loss)`` (not jitted);
    ``abstract``: weights as shapes only (nothing allocated, for a compile-only device)."""
    def loss(m, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    return adamw_train_step(name, loss, dtype=dtype, attn_impl=attn_impl, abstract=abstract, train_mode=True)


def train_step_throughput(name: str, *, batch: int, dtype: str, steps: int, warmup: int = 2,
                          attn_impl: str = "auto", image_size: int | None = None,
                          compile_only: bool = False) -> dict:
    """Median ms and images/s of forward + backward + AdamW update on random images.
    ``compile_only``: compile the step for a compile-only H100 instead (``compile_s``)."""
    model, loss_step, state = image_train_step(name, dtype=dtype, attn_impl=attn_impl, abstract=compile_only)
    params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    size = image_size or model.cfg.image_size

    if compile_only:
        from jaxattn.bench import aot, runner

        x = jax.ShapeDtypeStruct((batch, size, size, model.cfg.in_channels), jnp.float32)
        secs = runner.compile_for_gpu(jax.jit(loss_step), aot.on_compile_only_gpu(
            (state, x, jax.ShapeDtypeStruct((batch,), jnp.int32))))
        return dict(model=name, mode="train", batch=batch, dtype=dtype, image_size=size, params=int(params),
                    compile_s=secs)
    x = _images(model, batch, image_size)
    y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, model.cfg.num_classes)
    step = jax.jit(lambda state: loss_step(state, x, y))
    box = [state]

    def run():
        box[0], loss = step(box[0])
        return loss

    ms = _median_ms(run, steps, warmup)
    return dict(model=name, mode="train", batch=batch, dtype=dtype, image_size=int(x.shape[1]),
                params=int(params), ms=ms, images_per_s=batch / (ms * 1e-3))


def inference_throughput(name: str, *, batch: int, dtype: str, steps: int, warmup: int = 2,
                         attn_impl: str = "auto", image_size: int | None = None,
                         compile_only: bool = False) -> list[dict]:
    """Inference images/s with ``quantized`` off and on (same weights), and top-1 agreement. ``name``: a
    registered model (random weights) or a timm hub folder (its pretrained weights).
    ``compile_only``: compile both for a compile-only H100 instead (``compile_s``)."""
    from jaxattn.models import hf

    recs, preds = [], {}
    pretrained = hf.hf_model_type(name) == "timm"
    for quantized in (False, True):
        def build():
            # (a timm hub folder, e.g. a downloaded timm/vit_base_patch16_224.augreg2_in21k_ft_in1k: its weights)
            model = create_model(name, rngs=nnx.Rngs(0), dtype=dtype, attn_impl=attn_impl, quantized=quantized)
            model.eval()
            return model

        model = nnx.eval_shape(build) if compile_only else build()
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
        mode = "infer-quantized" if quantized else "infer"
        if compile_only:
            from jaxattn.bench import aot, runner

            size = image_size or model.cfg.image_size
            x = jax.ShapeDtypeStruct((batch, size, size, model.cfg.in_channels), jnp.float32)
            recs.append(dict(model=name, mode=mode, batch=batch, dtype=dtype, image_size=size,
                             compile_s=runner.compile_for_gpu(fwd, aot.on_compile_only_gpu((state, x)))))
            continue
        x = _images(model, batch, image_size)
        ms = _median_ms(lambda: fwd(state, x), steps, warmup)
        preds[quantized] = np.asarray(fwd(state, x)).argmax(-1)
        recs.append(dict(model=name, mode=mode, batch=batch, dtype=dtype, weights="pretrained" if pretrained else "random",
                         image_size=int(x.shape[1]), ms=ms, images_per_s=batch / (ms * 1e-3)))
    if not compile_only:
        recs[1]["top1_agreement"] = float((preds[True] == preds[False]).mean())
    return recs

"""FP8 tensor-core dots through Pallas's Triton lowering.

Triton keeps an FP8 x FP8 -> FP32 ``tt.dot`` off Hopper's FP8 WGMMA unless the op allows imprecise
accumulation (``maxNumImpreciseAcc``, the hardware accumulates FP8 products at reduced precision):
with the attribute unset it converts both operands to fp16 and runs MMA v2, which forfeits
SageAttention's FP8 ``P V`` speed. Triton's own Python front end sets it to ``2**30`` on sm90 by
default; Pallas's lowering never sets it. :func:`enable` wraps the lowering's ``tt.dot`` builder so
that dots whose operands are both FP8 get Triton's sm90 default; every other dot is untouched.
SageAttention bounds the imprecise accumulation itself: each key block's ``P V`` goes into a
fresh tile that is added to an FP32 accumulator (its two-level accumulation).
"""

from __future__ import annotations

import types
from typing import Any

MAX_IMPRECISE_ACC = 2**30  # Triton's sm90 default for FP8 dots
_FP8_TYPES = ("f8E4M3FN", "f8E5M2", "f8E4M3", "f8E4M3FNUZ", "f8E5M2FNUZ")
_enabled: bool | None = None


def _is_fp8(value: Any) -> bool:
    try:
        return str(value.type.element_type) in _FP8_TYPES
    except AttributeError:
        return False


def enable() -> bool:
    """Installs the wrapper once; True when Pallas's Triton lowering has the expected shape (a
    module-level ``tt_dialect`` whose ``dot`` takes ``max_num_imprecise_acc``), else False and
    nothing changes (the FP8 dots then still lower, on MMA v2)."""
    global _enabled
    if _enabled is not None:
        return _enabled
    _enabled = False
    try:
        from jax._src.pallas.triton import lowering
    except ImportError:
        return False
    dialect = getattr(lowering, "tt_dialect", None)
    dot = getattr(dialect, "dot", None)
    if dot is None or getattr(dot, "_jaxattn_fp8", False):
        _enabled = dot is not None
        return _enabled

    def fp8_dot(a, b, c, *args, max_num_imprecise_acc=None, **kwargs):
        if max_num_imprecise_acc is None and _is_fp8(a) and _is_fp8(b):
            max_num_imprecise_acc = MAX_IMPRECISE_ACC
        return dot(a, b, c, *args, max_num_imprecise_acc=max_num_imprecise_acc, **kwargs)

    fp8_dot._jaxattn_fp8 = True  # type: ignore[attr-defined]
    # a proxy of the dialect module for the lowering module only: other users keep the original
    proxy = types.ModuleType(dialect.__name__)
    proxy.__dict__.update(dialect.__dict__)
    proxy.dot = fp8_dot
    lowering.tt_dialect = proxy
    _enabled = True
    return True

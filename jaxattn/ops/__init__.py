"""Public ops: one function per attention variant, each with ``impl="auto"|"pallas"|"xla"``."""

from jaxattn.ops.attention import attention

__all__ = ["attention"]

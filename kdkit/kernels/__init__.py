"""Fused kernels: the chunked linear + token-KD loss that never materialises tokens x vocab logits."""
from .fused_linear_kd import BACKENDS, fused_linear_kd

__all__ = ["BACKENDS", "fused_linear_kd"]

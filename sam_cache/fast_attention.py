"""A faster attention for segment-anything's ViT image encoder, equal to the stock one.

segment-anything's ``Attention`` materializes ``softmax(q k^T * scale + rel_pos)`` with explicit
matrix products. :func:`use_fast_attention` swaps each block's forward for one that hands the
same computation to ``torch.nn.functional.scaled_dot_product_attention``, with the decomposed
relative-position term (``rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]``, built from the
*unscaled* query exactly as ``add_decomposed_rel_pos`` does) passed as an additive mask. On CUDA
SDPA then picks a fused kernel; on any device the result equals the stock encoder to float
tolerance (a test states the relative error). The weights are untouched, so this is not part of a
store's signature.

``kind="flex"`` computes the relative position *inside* the attention kernel instead, with
``torch.nn.attention.flex_attention`` and a ``score_mod`` that adds ``rel_h[q, k // W] +
rel_w[q, k % W]``: the ``(HW, HW)`` bias is never materialized, only the ``(HW, H)`` and
``(HW, W)`` tables. On CUDA the kernel is compiled (``torch.compile(flex_attention)``); on the
CPU it runs eagerly, slowly, which is enough for the equivalence test. It is opt-in
(``--attention flex``): SDPA stays the CUDA default until flex is measured faster there.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["use_fast_attention", "relative_position_bias", "KINDS"]

KINDS = ("sdpa", "flex")
_FLEX = {}


def relative_position_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                           size: tuple[int, int]) -> torch.Tensor:
    """The decomposed relative-position term as an additive ``(BH, HW, HW)`` attention mask.

    Arguments:
      q: ``(BH, HW, C)`` unscaled queries; rel_pos_h/rel_pos_w: the block's tables; size: (H, W).
    """
    from segment_anything.modeling.image_encoder import get_rel_pos

    h, w = size
    rh = get_rel_pos(h, h, rel_pos_h)
    rw = get_rel_pos(w, w, rel_pos_w)
    r_q = q.reshape(q.shape[0], h, w, q.shape[-1])
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh.to(q.dtype))
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw.to(q.dtype))
    return (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(q.shape[0], h * w, h * w)


def _sdpa_forward(self, x: torch.Tensor) -> torch.Tensor:
    b, h, w, _ = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, HW, C)
    mask = None
    if self.use_rel_pos:
        mask = relative_position_bias(q.reshape(b * self.num_heads, h * w, -1), self.rel_pos_h, self.rel_pos_w, (h, w))
        mask = mask.view(b, self.num_heads, h * w, h * w)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
    out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return self.proj(out)


def _flex_attention(device_type: str):
    """flex_attention, compiled once per process on CUDA (eager elsewhere)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention
    if "cuda" not in _FLEX:
        _FLEX["cuda"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["cuda"]


def _flex_forward(self, x: torch.Tensor) -> torch.Tensor:
    from segment_anything.modeling.image_encoder import get_rel_pos

    if not self.use_rel_pos:
        return _sdpa_forward(self, x)
    b, h, w, _ = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, HW, C)
    r_q = q.reshape(b, self.num_heads, h, w, q.shape[-1])
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, get_rel_pos(h, h, self.rel_pos_h).to(q.dtype)).reshape(
        b, self.num_heads, h * w, h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, get_rel_pos(w, w, self.rel_pos_w).to(q.dtype)).reshape(
        b, self.num_heads, h * w, w)

    def score_mod(score, bi, hi, qi, ki):
        return score + rel_h[bi, hi, qi, ki // w] + rel_w[bi, hi, qi, ki % w]

    out = _flex_attention(x.device.type)(q, k, v, score_mod=score_mod, scale=self.scale)
    out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return self.proj(out)


def use_fast_attention(model: nn.Module, kind: str = "sdpa") -> int:
    """Give every segment-anything ``Attention`` in ``model`` the ``sdpa`` or ``flex`` forward.

    Returns how many blocks were changed; models without such blocks (LiteMedSAM's TinyViT) are
    left as they are and 0 is returned.
    """
    from segment_anything.modeling.image_encoder import Attention

    if kind not in KINDS:
        raise ValueError(f"attention kind must be one of {KINDS}, got {kind!r}")
    forward = _sdpa_forward if kind == "sdpa" else _flex_forward
    n = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.forward = MethodType(forward, module)
            n += 1
    return n

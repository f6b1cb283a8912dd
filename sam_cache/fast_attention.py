"""A faster attention for segment-anything's ViT image encoder, equal to the stock one.

segment-anything's ``Attention`` materializes ``softmax(q k^T * scale + rel_pos)`` with explicit
matrix products. :func:`use_fast_attention` swaps each block's forward for one that hands the
same computation to ``torch.nn.functional.scaled_dot_product_attention``, with the decomposed
relative-position term (``rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]``, built from the
*unscaled* query exactly as ``add_decomposed_rel_pos`` does) passed as an additive mask. On CUDA
SDPA then picks a fused kernel; on any device the result equals the stock encoder to float
tolerance (a test states the relative error). The weights are untouched, so this is not part of a
store's signature.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["use_fast_attention", "relative_position_bias"]


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


def use_fast_attention(model: nn.Module) -> int:
    """Give every segment-anything ``Attention`` in ``model`` the SDPA forward; return how many.

    Models without such blocks (LiteMedSAM's TinyViT) are left as they are and 0 is returned.
    """
    from segment_anything.modeling.image_encoder import Attention

    n = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.forward = MethodType(_sdpa_forward, module)
            n += 1
    return n

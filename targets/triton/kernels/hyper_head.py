"""hc_post_head: the last block's hc_post and hc_head in one launch (the triton lowering's hc_ends.py);
hc_post_head_norm: with the final norm too.
hyper.py's hc_head kernel with POST: each K tile of its input is the last block's new streams, computed as hc_post
computes them (hyper._post_tile, as hc_post_pre's kernel does), stored to a scratch the collapse then reads, and
projected; the collapsed row is hc_head's of those streams, bit for bit. One launch a decode step fewer. With
the final rms_norm (NORM), the program that finishes a token then norms the collapsed row it stored with the
rms_norm kernel's row code (norm.norm_row): that kernel's bits, one launch fewer again.
"""

import torch

from .common import check, result
from .hyper import _check_float, _check_param, _check_post, head
from .norm import _row_size


def _post(out, streams, post, comb, addend):
    """hc_post's checked inputs -> ((B, S, hc, D), head's `prev`: the operands and a scratch for the new streams)."""
    dims = _check_post(out, streams, post, comb, addend)
    new = torch.empty(dims, dtype=torch.float32, device=streams.device)
    addend = None if addend is None else addend.contiguous()
    return dims, (out.contiguous(), addend, post.contiguous(), comb.contiguous(), new)


def hc_post_head(out, streams, post, comb, fn, base, scale, addend=None, *, eps, norm_eps, config=None, into=None):
    """hc_head(hc_post(out, streams, post, comb, addend), fn, base, scale) -> collapsed [B, S, D] fp32; the new
    streams are not a result (nothing after the last block reads them)."""
    dims, prev = _post(out, streams, post, comb, addend)
    return head(streams, dims, fn, base, scale, prev, eps, norm_eps, config, into, "hc_post_head")


def hc_post_head_norm(out, streams, post, comb, fn, base, scale, norm_weight, addend=None, *, eps, norm_eps, norm,
                      config=None, into=None):
    """rms_norm(hc_post_head(..), norm_weight, **norm) -> [B, S, D] fp32 (norm: {eps}); the collapsed row is not a
    result (the norm alone reads it)."""
    dims, prev = _post(out, streams, post, comb, addend)
    d = dims[3]
    _check_param("norm_weight", norm_weight, (d,))
    check(isinstance(norm, dict) and set(norm) == {"eps"}, f"norm: expected {{eps}}, got {norm!r}")
    _check_float("norm eps", norm["eps"])
    normed = result(into, (*dims[:2], d), torch.float32, streams.device)
    norm_args = (norm_weight.contiguous(), norm["eps"], normed, _row_size("norm_weight", d))
    return head(streams, dims, fn, base, scale, prev, eps, norm_eps, config, None, "hc_post_head_norm", norm_args)


LAUNCHERS = {"hc_post_head": hc_post_head, "hc_post_head_norm": hc_post_head_norm}

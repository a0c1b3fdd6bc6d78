"""hc_post_head: the last block's hc_post and hc_head in one launch (the triton lowering's hc_ends.py).
hyper.py's hc_head kernel with POST: each K tile of its input is the last block's new streams, computed as hc_post
computes them (hyper._post_tile, as hc_post_pre's kernel does), stored to a scratch the collapse then reads, and
projected; the collapsed row is hc_head's of those streams, bit for bit. One launch a decode step fewer.
"""

import torch

from .hyper import _check_post, head


def hc_post_head(out, streams, post, comb, fn, base, scale, addend=None, *, eps, norm_eps, config=None, into=None):
    """hc_head(hc_post(out, streams, post, comb, addend), fn, base, scale) -> collapsed [B, S, D] fp32; the new
    streams are not a result (nothing after the last block reads them)."""
    dims = _check_post(out, streams, post, comb, addend)
    new = torch.empty(dims, dtype=torch.float32, device=streams.device)
    addend = None if addend is None else addend.contiguous()
    prev = (out.contiguous(), addend, post.contiguous(), comb.contiguous(), new)
    return head(streams, dims, fn, base, scale, prev, eps, norm_eps, config, into, "hc_post_head")


LAUNCHERS = {"hc_post_head": hc_post_head}

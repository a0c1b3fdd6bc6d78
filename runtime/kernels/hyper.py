"""Manifold-constrained hyper-connections (mHC): the residual is `hc` parallel streams.

`hc_pre` collapses the streams into a block input and computes how to expand the block output
(`post`) and mix the residual (`comb`, Sinkhorn-normalised); `hc_post` applies them; `hc_head`
collapses the streams once more before the final norm.
"""

import torch
import torch.nn.functional as F

from .basic import expand_rows, rms_norm


def hc_expand(x, *, hc):
    """x: [B, S, D] -> [B, S, hc, D] (the same stream hc times)."""
    return expand_rows(x.float(), hc)


def hc_pre(streams, fn, base, scale, *, iters, eps, norm_eps):
    """streams: [B, S, hc, D], fn: [(2+hc)*hc, hc*D], base: [(2+hc)*hc], scale: [3]
    -> collapsed [B, S, D], post [B, S, hc], comb [B, S, hc, hc]."""
    streams = streams.float()
    b, s, hc, _ = streams.shape
    mixes = F.linear(rms_norm(streams.reshape(b, s, -1), eps=norm_eps), fn.float())
    pre_w, post_w, comb_w = mixes.split([hc, hc, hc * hc], dim=-1)
    pre_b, post_b, comb_b = base.float().split([hc, hc, hc * hc])
    pre_s, post_s, comb_s = scale.float().unbind(0)
    pre = torch.sigmoid(pre_w * pre_s + pre_b) + eps
    post = 2 * torch.sigmoid(post_w * post_s + post_b)
    comb = torch.softmax(comb_w.view(b, s, hc, hc) * comb_s + comb_b.view(hc, hc), dim=-1) + eps
    # Sinkhorn-Knopp towards a doubly-stochastic matrix: columns first, then rows / columns.
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    collapsed = (pre.unsqueeze(-1) * streams).sum(dim=2)
    return collapsed, post, comb


def hc_post(out, streams, post, comb, addend=None):
    """out: [B, S, D], streams: [B, S, hc, D] -> [B, S, hc, D];
    new[j] = post[j] * out + sum_i comb[i, j] * streams[i]. addend [B, S, D] (the fuse pass's add_post): the
    block output is out + addend, as `add` computes it."""
    out = out.float() if addend is None else out.float() + addend.float()
    mixed = torch.matmul(comb.float().transpose(-1, -2), streams.float())
    return post.float().unsqueeze(-1) * out.unsqueeze(-2) + mixed


def hc_post_pre(out, streams, post, comb, fn, base, scale, addend=None, *, iters, eps, norm_eps):
    """hc_post then the next block's hc_pre on its result (the fuse pass's post_pre) -> (new streams [B, S, hc, D],
    collapsed, post, comb as hc_pre returns them)."""
    new = hc_post(out, streams, post, comb, addend)
    return (new, *hc_pre(new, fn, base, scale, iters=iters, eps=eps, norm_eps=norm_eps))


def hc_head(streams, fn, base, scale, *, eps, norm_eps):
    """streams: [B, S, hc, D], fn: [hc, hc*D], base: [hc], scale: [1] -> [B, S, D]."""
    streams = streams.float()
    mixes = F.linear(rms_norm(streams.flatten(2), eps=norm_eps), fn.float())
    pre = torch.sigmoid(mixes * scale.float() + base.float()) + eps
    return (pre.unsqueeze(-1) * streams).sum(dim=2)


def hc_post_head(out, streams, post, comb, fn, base, scale, addend=None, *, eps, norm_eps):
    """hc_post then hc_head on its result (the triton target's last block: one launch) -> collapsed [B, S, D]."""
    return hc_head(hc_post(out, streams, post, comb, addend), fn, base, scale, eps=eps, norm_eps=norm_eps)


def hc_post_head_norm(out, streams, post, comb, fn, base, scale, norm_weight, addend=None, *, eps, norm_eps, norm):
    """rms_norm(hc_post_head(..), norm_weight, eps=norm["eps"]): the final norm too (the triton target: one
    launch)."""
    return rms_norm(hc_post_head(out, streams, post, comb, fn, base, scale, addend, eps=eps, norm_eps=norm_eps),
                    norm_weight, eps=norm["eps"])

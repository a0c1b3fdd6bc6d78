"""hc_post_pre_quant: the fuse pass's post_pre_quant, hc_post_pre (hyper.py) and the rms_norm_quant (norm.py) that
reads its collapsed row in one launch. hyper.py's kernel with QUANT: the program that finishes a token (its gates,
Sinkhorn and collapse) then norms and quantizes the collapsed row it just stored, with the rms_norm_quant kernel's
row code (norm.norm_quant_row), so the codes, scales and normed row are that kernel's bit for bit. In V4 that is
every block's input norm (input_layernorm, post_attention_layernorm) after the first: two launches a layer fewer.
"""

import torch

from .common import cdiv, check, result, results, same_device
from .hyper import _check_float, _check_param, _check_post, _pre
from .norm import quant_tiles


def hc_post_pre_quant(out, streams, post, comb, fn, base, scale, norm_weight, addend=None, *, iters, eps, norm_eps,
                      quant, config=None, into=None):
    """hc_post_pre, then rms_norm_quant(collapsed, norm_weight, **quant) in the same launch (the fuse pass's
    post_pre_quant): each token's finishing program norms and quantizes its collapsed row as the rms_norm_quant
    kernel does (the same bits). quant: {eps, group, scale_format, keep?} -> (new streams, collapsed, post, comb,
    e4m3 codes [B, S, D], fp32 group scales [B, S, cdiv(D, group)], and with keep the normed row)."""
    b, s, hc, d = _check_post(out, streams, post, comb, addend)
    check(isinstance(quant, dict) and {"eps", "group", "scale_format"} <= set(quant)
          and set(quant) <= {"eps", "group", "scale_format", "keep"},
          f"quant: expected {{eps, group, scale_format, keep?}} (rms_norm_quant's attributes), got {quant!r}")
    fmt, keep = quant["scale_format"], quant.get("keep", False)
    check(fmt in ("fp32", "ue8m0"), f"quant: scale_format {fmt!r} is not supported; expected fp32 or ue8m0")
    check(isinstance(keep, bool), f"quant: keep must be true or false, got {keep!r}")
    _check_float("quant eps", quant["eps"])
    tiles = quant_tiles("streams", d, quant["group"])
    _check_param("norm_weight", norm_weight, (d,))
    same_device(streams=streams, norm_weight=norm_weight)
    into_n, *into_pre = results(into, 7 if keep else 6)
    new = result(into_n, (b, s, hc, d), torch.float32, streams.device)
    n_groups = cdiv(d, quant["group"])
    codes = result(into_pre[3], (b, s, d), torch.float8_e4m3fn, streams.device)
    scales = result(into_pre[4], (b, s, n_groups), torch.float32, streams.device)
    normed = result(into_pre[5], (b, s, d), torch.float32, streams.device) if keep else None
    addend = None if addend is None else addend.contiguous()
    prev = (out.contiguous(), addend, post.contiguous(), comb.contiguous(), new)
    norm = (norm_weight.contiguous(), float(quant["eps"]), quant["group"], fmt == "ue8m0", codes, scales, normed, tiles)
    pre = _pre(streams, (b, s, hc, d), fn, base, scale, prev, iters, eps, norm_eps, config, into_pre[:3],
               "hc_post_pre_quant", norm)
    return (new, *pre, codes, scales, *([normed] if keep else []))


LAUNCHERS = {"hc_post_pre_quant": hc_post_pre_quant}

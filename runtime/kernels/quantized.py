"""Kernels over FP8 / FP4 weights kept in their quantized storage (reference versions).

Weights are dequantized per call, one matrix (or one expert) at a time, so no full-precision
copy is kept; activations are quantized as the op's `act` attribute says (see
`quant.fake_quant_act`). `fake_quant` is the same activation quantization as an op, for the
fake-quant reference path that tests compare these kernels against. `rms_norm_quant` (made by the
fuse pass) quantizes a norm's output once for the FP8 projections that read it: `linear_fp8` and
`moe_experts_q` then get e4m3 codes and their group scales instead of a float x; `swiglu_linear_fp8` (fuse
too) is a linear_fp8 of a SwiGLU, `hc_post_pre_quant` an rms_norm_quant of hc_post_pre's collapsed row.
"""

import torch.nn.functional as F

from ..quant import dequant_fp4, dequant_fp8, dequant_groups, fake_quant_act, quant_groups
from .basic import expand_rows, grouped_linear, rms_norm, swiglu
from .hyper import hc_post_pre
from .moe import run_experts


def fake_quant(x, *, act):
    return fake_quant_act(x, act)


def rms_norm_quant(x, weight=None, *, eps, group, scale_format="fp32", keep=False):
    """rms_norm, then dynamic per-token-group FP8 quantization: x [..., K] -> (e4m3 codes [..., K],
    fp32 scales [..., ceil(K/group)]); codes * scales = fake_quant_groups(rms_norm(x)) exactly.
    keep: also the norm's output itself (third), for the readers that take it unquantized."""
    y = rms_norm(x, weight, eps=eps)
    return (*quant_groups(y, group, scale_format), y) if keep else quant_groups(y, group, scale_format)


def hc_post_pre_quant(out, streams, post, comb, fn, base, scale, norm_weight, addend=None, *, iters, eps, norm_eps,
                      quant):
    """hc_post_pre, then rms_norm_quant of its collapsed row (the fuse pass's post_pre_quant: the next block's input
    norm) -> (new streams, collapsed, post, comb, codes, scales[, the normed row with quant's keep]);
    quant: rms_norm_quant's attributes {eps, group, scale_format, keep?}."""
    mixed = hc_post_pre(out, streams, post, comb, fn, base, scale, addend, iters=iters, eps=eps, norm_eps=norm_eps)
    return (*mixed, *rms_norm_quant(mixed[1], norm_weight, **quant))


def linear_fp8(x, weight, scale, x_scale=None, *, block, act):
    """x: [..., K], weight: e4m3 [N, K] with block scales -> [..., N] = q(x) dq(W)^T. With `x_scale`,
    x holds q(x) already: e4m3 codes with their fp32 scales [..., ceil(K/group)] (act's group)."""
    xq = fake_quant_act(x, act) if x_scale is None else dequant_groups(x, x_scale, act["group"])
    return F.linear(xq, dequant_fp8(weight, scale, block))


def norm_linear_fp8(x, norm_weight, weight, scale, *, eps, block, act, sizes=None):
    """linear_fp8(rms_norm(x, norm_weight, eps=eps), weight, scale), or linear_fp8_cat's results with `sizes`: the
    triton target's one op for an rms_norm_quant read only by one FP8 projection (V4's q_a_norm before q_b_proj),
    which it runs as one GEMM launch at decode sizes. The same numbers as the two ops (act is the norm's
    quantization)."""
    y = linear_fp8(rms_norm(x, norm_weight, eps=eps), weight, scale, block=block, act=act)
    return y if sizes is None else tuple(part.contiguous() for part in y.split(sizes, -1))


def swiglu_linear_fp8(gate, up, weight, scale, *, block, act, limit=None):
    """linear_fp8(swiglu(gate, up, limit=limit), weight, scale): the fuse pass's one op for a SwiGLU read only by
    an FP8 projection (V4's shared expert down projection), which the triton target runs as one GEMM launch."""
    return linear_fp8(swiglu(gate, up, limit=limit), weight, scale, block=block, act=act)


def linear_fp8_cat(x, weight, scale, x_scale=None, *, sizes, block, act):
    """Sibling FP8 projections of one x (the triton target joins them, one launch): linear_fp8 over their weights
    one after another, split into one [..., n] per n in sizes."""
    return tuple(y.contiguous() for y in linear_fp8(x, weight, scale, x_scale, block=block, act=act).split(sizes, -1))


def grouped_linear_fp8(x, weight, scale, *, groups, block, act):
    return grouped_linear(fake_quant_act(x, act), dequant_fp8(weight, scale, block), groups=groups)


def embed_fp8(tokens, weight, scale, *, block, hc=None):
    """Rows of an e4m3 embedding table, dequantized with their block scales. -> [B, S, D] ([B, S, hc, D] with hc,
    as embed)."""
    rows = scale.float().repeat_interleave(block[1], dim=1)[:, : weight.shape[1]]  # [ceil(V/bo), D]
    return expand_rows(weight[tokens].float() * rows[tokens // block[0]], hc)


def _dequant_expert(q, s, fmt, block):
    return dequant_fp4(q, s) if fmt == "fp4" else dequant_fp8(q, s, block)


def moe_experts_q(x, weights, idx, gate_up, gate_up_scale, down, down_scale, x_scale=None, *, format, block,
                  down_block, act_in, act_mid, limit=None):
    """Routed experts over FP8 (block scales; `block` for gate_up, `down_block` for down) or FP4
    (packed, per-32 UE8M0 scales) weights. With `x_scale`, x holds q_in(x) already: e4m3 codes with
    their fp32 scales [..., ceil(D/group)] (act_in's group), as rms_norm_quant writes them."""
    return _run_quantized(x, weights, idx, _routed(gate_up, gate_up_scale, down, down_scale, format, block, down_block),
                          x_scale, act_in, act_mid, limit)


def moe_experts_q_shared(x, weights, idx, gate_up, gate_up_scale, down, down_scale, shared_gate_up,
                         shared_gate_up_scale, shared_down, shared_down_scale, x_scale=None, *, format, block,
                         down_block, shared_block, shared_down_block, act_in, act_mid, limit=None):
    """moe_experts_q whose expert id E (one past the E routed experts) is a shared expert with its own FP8 weights:
    shared_gate_up [2I, D] (gate rows first) and shared_down [D, I], block scales of shared_block /
    shared_down_block. The triton lowering routes a shared expert so where its weights cannot stack with the
    experts' (targets/triton/shared_expert.py): every token's slot E, weight 1, added after its routed experts."""
    routed = _routed(gate_up, gate_up_scale, down, down_scale, format, block, down_block)

    def expert(e):
        if e == gate_up.shape[0]:
            return (dequant_fp8(shared_gate_up, shared_gate_up_scale, shared_block),
                    dequant_fp8(shared_down, shared_down_scale, shared_down_block))
        return routed(e)
    return _run_quantized(x, weights, idx, expert, x_scale, act_in, act_mid, limit)


def _routed(gate_up, gate_up_scale, down, down_scale, format, block, down_block):
    """Expert e's (gate_up, down) dequantized to fp32, for run_experts."""
    return lambda e: (_dequant_expert(gate_up[e], gate_up_scale[e], format, block),
                      _dequant_expert(down[e], down_scale[e], format, down_block))


def _run_quantized(x, weights, idx, expert, x_scale, act_in, act_mid, limit):
    quant_in = lambda t: fake_quant_act(t, act_in)  # noqa: E731
    if x_scale is not None:  # x is q_in(x) already
        x, quant_in = dequant_groups(x, x_scale, act_in["group"]), None
    return run_experts(x, weights, idx, expert, limit=limit, quant_in=quant_in,
                       quant_mid=lambda t: fake_quant_act(t, act_mid))

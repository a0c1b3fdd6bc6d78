"""Launchers of the routed experts over quantized weights (moe.py's kernels): moe_experts_q, and
moe_experts_q_shared, with a shared expert of another format in the same two launches; the semantics of
runtime/kernels/quantized.py's functions of the same names.

The triton lowering (targets/triton/shared_expert.py) routes a MoE block's shared expert as expert E, one more pair
of every token. Where its FP8 weights stack with the experts' (FP8 alike), plain moe_experts_q runs it; where they
cannot (FP4 experts, DeepSeek's release format, or FP8 experts of other blocks or scale dtype), its weights stay
its own, [2I, D] and [D, I] e4m3 with block scales, and each tile of expert E takes them in a K loop of its own
(the kernel's SHARED).
"""

import torch

from .common import cdiv, check, check_tensor, same_device
from .gemm import check_x_scale
from .moe import _check_x, _run_experts, _weight


def moe_experts_q(x, weights, idx, gate_up, gate_up_scale, down, down_scale, x_scale=None, *, format, block,
                  down_block, act_in, act_mid, limit=None, config=None, into=None):
    """Routed experts over quantized weights, dequantized in the GEMMs. format "fp8": e4m3 gate_up
    [E, 2I, D] / down [E, D, I] with block scales [E, ceil(rows/bo), ceil(cols/bi)] (f32 or UE8M0;
    (bo, bi) = block / down_block); "fp4": int8 [E, rows, cols/2] with UE8M0 scales [E, rows, ceil(cols/32)]
    (block ignored). Activations: act_in / act_mid as in runtime/quant.fake_quant_act. -> [..., D] f32.
    With x_scale (fp32 [..., ceil(D/group)], act_in dynamic), x is q_in(x) already: e4m3 codes, as
    rms_norm_quant writes them; the gate_up GEMM reads the codes and their scales instead of quantizing x."""
    gu, dn, d, inter = quantized_experts(x, gate_up, gate_up_scale, down, down_scale, format, block, down_block)
    return run_quantized("moe_experts_q", x, weights, idx, gu, dn, d, inter, x_scale, act_in=act_in, act_mid=act_mid,
                         limit=limit, config=config, into=into)


def run_quantized(name, x, weights, idx, gu, dn, d, inter, x_scale, *, act_in, act_mid, limit, config, into,
                  shared=None):
    """_run_experts over quantized_experts' weights, the activation formats and x (codes with x_scale) checked."""
    for role, act in (("act_in", act_in), ("act_mid", act_mid)):
        check(isinstance(act, dict), f"{role}: expected a dict (mode none / static / dynamic), got {act!r}")
    _check_x(x, d, "gate_up's D", codes=x_scale is not None)
    if x_scale is not None:
        check_x_scale(x, x_scale, act_in, "act_in")
    return _run_experts(name, x, weights, idx, gu, dn, inter, limit=limit, act_in=act_in, act_mid=act_mid,
                        config=config, into=into, x_scale=x_scale, shared=shared)


def quantized_experts(x, gate_up, gate_up_scale, down, down_scale, format, block, down_block, prefix=""):
    """Checks a stacked pair of quantized expert weights (see moe_experts_q; `prefix` names them in errors) ->
    (gate_up, down: the kernels' weight arguments (`_weight`), D, the intermediate size)."""
    check(format in ("fp8", "fp4"), f"{prefix}format {format!r}; supported: fp8, fp4")
    fp4 = format == "fp4"
    wtypes = (torch.int8, torch.uint8) if fp4 else (torch.float8_e4m3fn,)
    check_tensor(f"{prefix}gate_up", gate_up, dtypes=wtypes, dim=3)
    check_tensor(f"{prefix}down", down, dtypes=wtypes, dim=3)
    e, two_i, d = gate_up.shape[0], gate_up.shape[1], gate_up.shape[2] * (2 if fp4 else 1)
    inter = two_i // 2
    check(two_i % 2 == 0, f"{prefix}gate_up: rows must be 2*inter (gate then up), got {two_i}")
    want = (e, d, inter // 2 if fp4 else inter)
    check(tuple(down.shape) == want and (not fp4 or inter % 2 == 0),
          f"{prefix}down: expected shape {list(want)} for {format}, got {list(down.shape)}")
    for name, blk in ((f"{prefix}block", block), (f"{prefix}down_block", down_block)):
        ok = isinstance(blk, (list, tuple)) and len(blk) == 2 and all(isinstance(v, int) and v >= 1 for v in blk)
        check(fp4 or ok, f"{name}: expected [rows, cols] of positive ints, got {blk!r}")
    blocks = [(1, 32)] * 2 if fp4 else [tuple(block), tuple(down_block)]
    scale_types = (torch.float8_e8m0fnu,) if fp4 else (torch.float32, torch.float8_e8m0fnu)
    for name, s, (rows, cols), (bo, bi) in ((f"{prefix}gate_up_scale", gate_up_scale, (two_i, d), blocks[0]),
                                            (f"{prefix}down_scale", down_scale, (d, inter), blocks[1])):
        check_tensor(name, s, dtypes=scale_types, dim=3)
        want = (e, cdiv(rows, bo), cdiv(cols, bi))
        check(tuple(s.shape) == want, f"{name}: expected shape {list(want)}, got {list(s.shape)}")
    same_device(x=x, gate_up=gate_up, gate_up_scale=gate_up_scale, down=down, down_scale=down_scale)
    return _weight(gate_up, gate_up_scale, format, blocks[0]), _weight(down, down_scale, format, blocks[1]), d, inter


def moe_experts_q_shared(x, weights, idx, gate_up, gate_up_scale, down, down_scale, shared_gate_up,
                         shared_gate_up_scale, shared_down, shared_down_scale, x_scale=None, *, format, block,
                         down_block, shared_block, shared_down_block, act_in, act_mid, limit=None, config=None,
                         into=None):
    """moe_experts_q (see there: x, weights [..., k], idx [..., k], the E routed experts' stacked weights in
    `format`) where expert id E is a shared expert of its own FP8 weights: shared_gate_up e4m3 [2I, D] (gate rows
    first) and shared_down [D, I], block scales [ceil(rows/bo), ceil(cols/bi)] (f32 or UE8M0; (bo, bi) =
    shared_block / shared_down_block), the same I and D as the experts'. -> [..., D] f32."""
    gu, dn, d, inter = quantized_experts(x, gate_up, gate_up_scale, down, down_scale, format, block, down_block)
    for name, t in (("shared_gate_up", shared_gate_up), ("shared_gate_up_scale", shared_gate_up_scale),
                    ("shared_down", shared_down), ("shared_down_scale", shared_down_scale)):
        check_tensor(name, t, dim=2)
    sgu, sdn, sd, s_inter = quantized_experts(x, shared_gate_up[None], shared_gate_up_scale[None], shared_down[None],
                                              shared_down_scale[None], "fp8", shared_block, shared_down_block,
                                              prefix="shared_")
    check((sd, s_inter) == (d, inter), f"shared expert: expected D {d} and intermediate size {inter} (the experts'), "
          f"got D {sd} and {s_inter}")
    return run_quantized("moe_experts_q_shared", x, weights, idx, gu, dn, d, inter, x_scale, act_in=act_in,
                         act_mid=act_mid, limit=limit, config=config, into=into, shared=(sgu, sdn))


LAUNCHERS = {"moe_experts_q": moe_experts_q, "moe_experts_q_shared": moe_experts_q_shared}

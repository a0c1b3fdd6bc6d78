"""A CSA layer's two compressors (its KV entries and its indexer's keys) in one launch at a decode step.

`compress_pair` is two `compress` ops with the same semantics as two calls (runtime/kernels/compressor.py), the first's
state slots then the second's: the triton lowering's third rewrite (targets/triton/compress_pair.py) joins the two
of a CSA layer. At a device position (a decode step in a CUDA graph) it is one launch of grid (1, B, 2): program
(0, b, 0) runs compressor.py's program for the first op and (0, b, 1) for the second, each with its own
constexprs (widths, formats), so a program holds only its own op's code path; registers are the larger of the two.
At a host position (eager steps, prefill) it is the two compress calls: most decode steps then launch nothing
(the token only joins the window buffer) and a prefill launches per closed windows.
"""

import triton
import triton.language as tl

from .common import check, launch_config, position
from .compressor import _check_inputs, _compress_program, compress, device_position_args


@triton.jit
def _compress_pair_kernel(kv_ptr_a, gate_ptr_a, ape_ptr_a, ovl_kv_ptr_a, ovl_gate_ptr_a, w_ptr_a, inv_ptr_a, out_ptr_a,
                          enc_ptr_a, pos_ptr_a, new_kv_ptr_a, new_gate_ptr_a, new_kv_sb_a, new_kv_sc_a, new_gate_sb_a,
                          new_gate_sc_a, L_a, stride_ob_a, stride_ot_a, stride_eb_a, stride_et_a, stride_first_a,
                          first_a, eps_a, rope_scale_a, kv_ptr_b, gate_ptr_b, ape_ptr_b, ovl_kv_ptr_b, ovl_gate_ptr_b,
                          w_ptr_b, inv_ptr_b, out_ptr_b, enc_ptr_b, pos_ptr_b, new_kv_ptr_b, new_gate_ptr_b,
                          new_kv_sb_b, new_kv_sc_b, new_gate_sb_b, new_gate_sc_b, L_b, stride_ob_b, stride_ot_b,
                          stride_eb_b, stride_et_b, stride_first_b, first_b, eps_b, rope_scale_b, RATE_A: tl.constexpr,
                          C_A: tl.constexpr, D_A: tl.constexpr, NOPE_A: tl.constexpr, WIN_A: tl.constexpr, OFF_A:
                          tl.constexpr, COL_CUR_A: tl.constexpr, HAS_PREV_A: tl.constexpr, HAS_W_A: tl.constexpr, FMT_A:
                          tl.constexpr, DEVICE_POS_A: tl.constexpr, CARRY_A: tl.constexpr, BLOCK_R_A: tl.constexpr,
                          BLOCK_P_A: tl.constexpr, BLOCK_G_A: tl.constexpr, BLOCK_E_A: tl.constexpr, BLOCK_C_A:
                          tl.constexpr, RATE_B: tl.constexpr, C_B: tl.constexpr, D_B: tl.constexpr, NOPE_B:
                          tl.constexpr, WIN_B: tl.constexpr, OFF_B: tl.constexpr, COL_CUR_B: tl.constexpr, HAS_PREV_B:
                          tl.constexpr, HAS_W_B: tl.constexpr, FMT_B: tl.constexpr, DEVICE_POS_B: tl.constexpr, CARRY_B:
                          tl.constexpr, BLOCK_R_B: tl.constexpr, BLOCK_P_B: tl.constexpr, BLOCK_G_B: tl.constexpr,
                          BLOCK_E_B: tl.constexpr, BLOCK_C_B: tl.constexpr):
    """Grid (1, B, 2): program (0, b, p) is compressor._compress_program (0, b) of op p (a: the first, b: the
    second), at a device position."""
    w = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if tl.program_id(2) == 0:
        _compress_program(w, b, kv_ptr_a, gate_ptr_a, ape_ptr_a, ovl_kv_ptr_a, ovl_gate_ptr_a, w_ptr_a, inv_ptr_a,
                          out_ptr_a, enc_ptr_a, pos_ptr_a, new_kv_ptr_a, new_gate_ptr_a, new_kv_sb_a, new_kv_sc_a,
                          new_gate_sb_a, new_gate_sc_a, L_a, stride_ob_a, stride_ot_a, stride_eb_a, stride_et_a,
                          stride_first_a, first_a, eps_a, rope_scale_a, RATE_A, C_A, D_A, NOPE_A, WIN_A, OFF_A,
                          COL_CUR_A, HAS_PREV_A, HAS_W_A, FMT_A, DEVICE_POS_A, CARRY_A, BLOCK_R_A, BLOCK_P_A, BLOCK_G_A,
                          BLOCK_E_A, BLOCK_C_A)
    else:
        _compress_program(w, b, kv_ptr_b, gate_ptr_b, ape_ptr_b, ovl_kv_ptr_b, ovl_gate_ptr_b, w_ptr_b, inv_ptr_b,
                          out_ptr_b, enc_ptr_b, pos_ptr_b, new_kv_ptr_b, new_gate_ptr_b, new_kv_sb_b, new_kv_sc_b,
                          new_gate_sb_b, new_gate_sc_b, L_b, stride_ob_b, stride_ot_b, stride_eb_b, stride_et_b,
                          stride_first_b, first_b, eps_b, rope_scale_b, RATE_B, C_B, D_B, NOPE_B, WIN_B, OFF_B,
                          COL_CUR_B, HAS_PREV_B, HAS_W_B, FMT_B, DEVICE_POS_B, CARRY_B, BLOCK_R_B, BLOCK_P_B, BLOCK_G_B,
                          BLOCK_E_B, BLOCK_C_B)


def _split(state, first: dict):
    n = 5 if first.get("overlap") else 3
    check(isinstance(state, (tuple, list)) and len(state) > n,
          f"state: expected the first compressor's {n} slots then the second's, got "
          f"{len(state) if isinstance(state, (tuple, list)) else type(state).__name__}")
    return tuple(state[:n]), tuple(state[n:])


def _op_attrs(name: str, attrs) -> dict:
    check(isinstance(attrs, dict) and {"rate", "overlap", "eps"} <= set(attrs)
          and set(attrs) <= {"rate", "overlap", "eps", "rope_scale", "kv_format"},
          f"{name}: expected a compress op's attributes (rate, overlap, eps, rope_scale?, kv_format?), got {attrs!r}")
    return {"rope_scale": 1.0, "kv_format": "f32", **attrs}


def compress_pair(kv, gate, ape, norm_weight, inv_freq, kv2, gate2, ape2, norm_weight2, inv_freq2, *, state, pos0,
                  first, second, config=None):
    """compress(kv, gate, ape, norm_weight, inv_freq, **first) and compress(kv2, .., **second), in that order;
    state: the first's slots (buf_kv, buf_gate, (ovl_kv, ovl_gate,) entries) then the second's. At a device
    position one launch (both ops' checks first), else the two compress calls."""
    first, second = _op_attrs("first", first), _op_attrs("second", second)
    state_a, state_b = _split(state, first)
    if position(pos0, kv.device) is not None:
        compress(kv, gate, ape, norm_weight, inv_freq, state=state_a, pos0=pos0, config=config, **first)
        compress(kv2, gate2, ape2, norm_weight2, inv_freq2, state=state_b, pos0=pos0, config=config, **second)
        return
    cfg = launch_config(config, {"block_r": 16, "num_warps": 4}, "compress_pair")
    launch = []
    for ins, st, attrs in (((kv, gate, ape, norm_weight, inv_freq), state_a, first),
                           ((kv2, gate2, ape2, norm_weight2, inv_freq2), state_b, second)):
        full = _check_inputs(*ins, st, attrs["rate"], attrs["overlap"], attrs["kv_format"])
        launch.append(device_position_args(*ins, *full, pos0, rate=attrs["rate"], overlap=attrs["overlap"],
                                           eps=attrs["eps"], rope_scale=attrs["rope_scale"],
                                           kv_format=attrs["kv_format"], cfg=cfg))
    check(kv.shape[0] == kv2.shape[0], f"kv2: batch {kv2.shape[0]} differs from kv's {kv.shape[0]}")
    (args_a, consts_a), (args_b, consts_b) = launch
    _compress_pair_kernel[(1, kv.shape[0], 2)](*args_a, *args_b, **{f"{k}_A": v for k, v in consts_a.items()},
                                               **{f"{k}_B": v for k, v in consts_b.items()},
                                               num_warps=cfg["num_warps"])


compress_pair.device_position = True  # takes pos0 as a device tensor (common.position)
LAUNCHERS = {"compress_pair": compress_pair}

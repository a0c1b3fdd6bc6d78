"""The fuse passes' GEMM ops, one launch each (gemm.py's kernel, its activation computed where its tiles are loaded):

- swiglu_linear_fp8 (the fuse pass's swiglu_linear): the activation is swiglu(gate, up), the swiglu kernel's
  arithmetic (V4's shared expert down projection);
- norm_linear_fp8 (the triton target's norm_gemm rewrite, targets/triton/norm_gemm.py): the activation is
  rms_norm(x, norm weight), normed with the rms_norm_quant kernel's arithmetic (V4's q_a_norm before q_b_proj, and
  the first block's input norm); below QUANT_ONCE_MIN_TOKENS rows every program takes its rows' 1 / rms and
  normalizes each tile it loads, so the norm launch is saved; from there on (QUANT_ONCE) the rms_norm_quant kernel
  norms and quantizes the rows once and the GEMM reads the codes, as the two ops did.
"""

from .common import check, check_tensor, same_device
from .norm import _row_size
from .gemm import FLOAT_DTYPES, _cat_results, _check_block, _check_gemm_inputs, _check_sizes, _gemm, _result


def swiglu_linear_fp8(gate, up, weight, scale, *, block, act, limit=None, config=None, into=None):
    """linear_fp8(swiglu(gate, up, limit=limit), weight, scale) in one launch: the GEMM computes the SwiGLU where
    it loads its activation tiles (the fuse pass's swiglu_linear: V4's shared expert down projection). gate, up:
    [..., K], the same shape."""
    _check_gemm_inputs(gate, weight, scale, 1, name="gate")
    check_tensor("up", up, dtypes=FLOAT_DTYPES, contiguous=False)
    check(up.shape == gate.shape, f"gate, up: shapes {list(gate.shape)} and {list(up.shape)} differ (no broadcasting)")
    check(limit is None or isinstance(limit, (int, float)), f"limit: expected None or a number, got {limit!r}")
    same_device(gate=gate, up=up)
    bo_bi = _check_block(block, weight, scale)
    if gate.stride() != up.stride():  # the kernel reads both at the same offsets
        gate, up = gate.contiguous(), up.contiguous()
    lead, k = gate.shape[:-1], gate.shape[-1]
    y, y3 = _result(into, (*lead, weight.shape[0]), 1, gate.device)
    _gemm("swiglu_linear_fp8", gate.reshape(-1, 1, k), weight, [y3], scale, bo_bi, act, config,
          up3=up.reshape(-1, 1, k), limit=limit)
    return y


def norm_linear_fp8(x, norm_weight, weight, scale, *, eps, block, act, sizes=None, config=None, into=None):
    """linear_fp8(rms_norm(x, norm_weight, eps=eps), weight, scale) (or linear_fp8_cat's results with `sizes`) in
    one launch below QUANT_ONCE_MIN_TOKENS rows: x [..., K] float, norm_weight [K], act dynamic (the norm's codes are
    the GEMM's activation quantization)."""
    _check_gemm_inputs(x, weight, scale, 1)
    check(isinstance(act, dict) and act.get("mode") == "dynamic",
          f"norm_linear_fp8: act: expected dynamic activations (the norm's quantization), got {act!r}")
    check(isinstance(eps, (int, float)) and eps >= 0, f"eps: expected a number >= 0, got {eps!r}")
    k = x.shape[-1]
    _row_size("x", k)  # (the GEMM takes each row's sum of squares over one block, as the norm kernel does)
    check_tensor("norm_weight", norm_weight, dtypes=FLOAT_DTYPES, dim=1, contiguous=False)
    check(norm_weight.shape[0] == k, f"norm_weight: expected shape [{k}] (x's K), got {list(norm_weight.shape)}")
    norm_weight = norm_weight.contiguous()
    same_device(x=x, norm_weight=norm_weight)
    bo_bi = _check_block(block, weight, scale)
    x3 = x.contiguous().reshape(-1, 1, k)  # (the kernel reads each row's K channels as one block)
    if sizes is None:
        y, y3 = _result(into, (*x.shape[:-1], weight.shape[0]), 1, x.device)
        ys, y3s = y, [y3]
    else:
        ys, y3s = _cat_results(into, x.shape[:-1], _check_sizes(sizes, weight, bo_bi[0]), x.device)
        ys = tuple(ys)
    _gemm("norm_linear_fp8", x3, weight, y3s, scale, bo_bi, act, config, norm=(norm_weight, eps))
    return ys


LAUNCHERS = {"swiglu_linear_fp8": swiglu_linear_fp8, "norm_linear_fp8": norm_linear_fp8}

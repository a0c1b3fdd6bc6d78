"""The fused GEMM launchers (targets/triton/kernels/gemm_fused.py) against the two kernels they fold, in the Triton
interpreter: swiglu_linear_fp8 (the swiglu kernel, then linear_fp8) and norm_linear_fp8 (the rms_norm_quant kernel,
then linear_fp8 / linear_fp8_cat reading its codes). Each is compared bit for bit with the unfolded Triton kernels at
the same launch config (the same split and dot), and with the torch reference within test_triton_gemm.py's
projection tolerance (fp32 summation order).
"""

import pytest
import torch

from test_triton_gemm import ACTS, close, fp8_weight, randn
from v4c.runtime.kernels.quantized import linear_fp8 as ref_linear_fp8
from v4c.runtime.kernels.quantized import norm_linear_fp8 as ref_norm_linear_fp8
from v4c.runtime.kernels.quantized import swiglu_linear_fp8 as ref_swiglu_linear_fp8
from v4c.targets.triton.kernels.gemm import linear_fp8, linear_fp8_cat
from v4c.targets.triton.kernels.gemm_fused import LAUNCHERS, norm_linear_fp8, swiglu_linear_fp8
from v4c.targets.triton.kernels.norm import rms_norm_quant, swiglu


def test_launchers_are_registered():
    assert set(LAUNCHERS) == {"swiglu_linear_fp8", "norm_linear_fp8"}


# --- SwiGLU computed in the GEMM's activation loads (swiglu_linear_fp8) ---------------------------
SWIGLU_CASES = {"decode": (5, {}), "split-k": (5, {"BLOCK_K": 16, "SPLIT_K": 3}), "fp32-dot": (5, {"FP8_DOT": False}),
                "prefill": (70, {"BLOCK_N": 16}), "quant-once": (3, {"BLOCK_N": 16, "QUANT_ONCE": True})}


@pytest.mark.parametrize("act,m,config", [pytest.param(a, m, c, id=f"{name}-{'-'.join(str(v) for v in a.values())}")
                                          for name, (m, c) in SWIGLU_CASES.items() for a in ACTS
                                          if a["mode"] == "dynamic" or "QUANT_ONCE" not in c])  # (it needs dynamic)
@pytest.mark.parametrize("limit", [None, 1.5])
def test_swiglu_linear_fp8_is_the_swiglu_kernel_then_linear_fp8(act, m, config, limit):
    """One launch (the SwiGLU where the GEMM loads x: in the amax pass, the K tiles and the quantize-once kernel)
    gives linear_fp8 over the swiglu kernel's output bit for bit, with the same config (so the same split and
    dot), and so the reference linear_fp8 of that output within the projections' tolerance (the swiglu kernel
    against its reference: test_triton_norm.py; a last-bit difference there may move an e4m3 code, so the
    reference of the whole op is not a fixed-tolerance comparison). Odd sizes; limit 1.5 clamps ~45% of gate and up."""
    k, n = 80, 33
    gate, up = randn(2, m, k, seed=60) * 2, randn(2, m, k, seed=61) * 2  # outputs O(10), as TOL assumes
    w, s = fp8_weight(n, k, [16, 16], "ue8m0", seed=62)
    ours = swiglu_linear_fp8(gate, up, w, s, block=[16, 16], act=act, limit=limit, config=config)
    hidden = swiglu(gate, up, limit=limit)
    assert torch.equal(ours, linear_fp8(hidden, w, s, block=[16, 16], act=act, config=config))
    close(ours, ref_linear_fp8(hidden, w, s, block=[16, 16], act=act), w.dtype)


def test_swiglu_linear_fp8_inputs():
    """gate and up of other strides or dtypes are read correctly (made contiguous where their strides differ);
    mismatched shapes, a non-number limit and codes as gate are errors that name them."""
    gate = randn(50, 3, seed=63).t()  # [3, 50], column-major
    up = randn(3, 50, seed=64, dtype=torch.bfloat16)
    w, s = fp8_weight(17, 50, [1, 32], "fp32", seed=65)
    act = {"mode": "dynamic", "group": 32, "scale_format": "fp32"}
    ours = swiglu_linear_fp8(gate, up, w, s, block=[1, 32], act=act, limit=2.0)
    assert torch.equal(ours, linear_fp8(swiglu(gate, up, limit=2.0), w, s, block=[1, 32], act=act))
    ref = ref_swiglu_linear_fp8(gate, up, w, s, block=[1, 32], act=act, limit=2.0)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())  # (seed-checked: no e4m3 flip)
    cases = [
        (lambda: swiglu_linear_fp8(gate, up[:, :49], w, s, block=[1, 32], act=act), "gate, up: shapes"),
        (lambda: swiglu_linear_fp8(gate, up, w, s, block=[1, 32], act=act, limit="10"), "limit: expected"),
        (lambda: swiglu_linear_fp8(gate.to(torch.float8_e4m3fn), up, w, s, block=[1, 32], act=act), "gate: dtype"),
        (lambda: swiglu_linear_fp8(gate[:, :40], up[:, :40], w, s, block=[1, 32], act=act), "match gate's K = 40"),
        (lambda: swiglu_linear_fp8(gate, up.long(), w, s, block=[1, 32], act=act), "up: dtype"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# --- RMSNorm computed in the GEMM's activation loads (norm_linear_fp8) ----------------------------
DYNAMIC = [a for a in ACTS if a["mode"] == "dynamic"]
NORM_CASES = {"decode": (5, {}), "split-k": (5, {"BLOCK_K": 16, "SPLIT_K": 3}), "fp32-dot": (5, {"FP8_DOT": False}),
              "amax-pass": (5, {"BLOCK_K": 16}), "m-tiles": (37, {"BLOCK_M": 16, "BLOCK_N": 16}),
              "prefill": (70, {"BLOCK_N": 16}), "quant-once": (3, {"BLOCK_N": 16, "QUANT_ONCE": True}),
              "one-n-tile": (70, {"BLOCK_N": 64})}


@pytest.mark.parametrize("act", DYNAMIC, ids=lambda a: "-".join(str(v) for v in a.values()))
@pytest.mark.parametrize("m,config", NORM_CASES.values(), ids=NORM_CASES)
@pytest.mark.parametrize("sizes", [None, [32, 16]], ids=["one", "siblings"])
def test_norm_linear_fp8_is_the_norm_kernel_then_linear_fp8(act, m, config, sizes):
    """One launch below 64 rows (each program takes its rows' 1 / rms, then norms each tile as it loads it: in the
    amax pass and the K tiles, at every split), the rms_norm_quant kernel then the GEMM from there on (prefill, and
    QUANT_ONCE true), or one launch where the GEMM has one N tile: every way, linear_fp8 (linear_fp8_cat with sizes)
    over the rms_norm_quant kernel's codes bit for bit at the same config, and the reference within the projection
    tolerance. K 80 leaves a partial activation group (16 of 32) and a partial row block; m 37 two partial M tiles."""
    k, n = 80, 48
    x = randn(2, m, k, seed=70) * 3
    norm_w = randn(k, seed=71).abs() + 0.5
    w, s = fp8_weight(n, k, [16, 16], "ue8m0", seed=72)
    ours = norm_linear_fp8(x, norm_w, w, s, eps=1e-6, block=[16, 16], act=act, sizes=sizes, config=config)
    codes, scales = rms_norm_quant(x, norm_w, eps=1e-6, group=act["group"], scale_format=act["scale_format"])
    if sizes is None:
        assert torch.equal(ours, linear_fp8(codes, w, s, scales, block=[16, 16], act=act, config=config))
        close(ours, ref_norm_linear_fp8(x, norm_w, w, s, eps=1e-6, block=[16, 16], act=act), w.dtype)
        return
    two = linear_fp8_cat(codes, w, s, scales, sizes=sizes, block=[16, 16], act=act, config=config)
    refs = ref_norm_linear_fp8(x, norm_w, w, s, eps=1e-6, block=[16, 16], act=act, sizes=sizes)
    assert len(ours) == len(sizes) == len(refs)
    for y, y2, ref in zip(ours, two, refs):
        assert torch.equal(y, y2)
        close(y, ref, w.dtype)


def test_norm_linear_fp8_inputs():
    """x of other strides or dtypes, and a bf16 norm weight, are read correctly (x made contiguous: the kernel reads
    each row as one block); a planned result is written into; static or no activation quantization, a norm weight
    of another width and a bad eps are errors that name them."""
    x = randn(50, 3, seed=73).t() * 3  # [3, 50], column-major
    norm_w = (randn(50, seed=74).abs() + 0.5).to(torch.bfloat16)
    w, s = fp8_weight(17, 50, [1, 32], "fp32", seed=75)
    act = {"mode": "dynamic", "group": 32, "scale_format": "fp32"}
    into = torch.empty(3, 17)
    ours = norm_linear_fp8(x.to(torch.bfloat16), norm_w, w, s, eps=1e-5, block=[1, 32], act=act, into=into)
    codes, scales = rms_norm_quant(x.to(torch.bfloat16), norm_w, eps=1e-5, group=32)
    assert ours.data_ptr() == into.data_ptr()
    assert torch.equal(ours, linear_fp8(codes, w, s, scales, block=[1, 32], act=act))
    codes, scales = rms_norm_quant(x, norm_w, eps=1e-5, group=32)
    assert torch.equal(norm_linear_fp8(x, norm_w, w, s, eps=1e-5, block=[1, 32], act=act),
                       linear_fp8(codes, w, s, scales, block=[1, 32], act=act))
    cases = [
        (lambda: norm_linear_fp8(x, norm_w, w, s, eps=1e-5, block=[1, 32], act={"mode": "static", "scale": 0.1}),
         "act: expected dynamic"),
        (lambda: norm_linear_fp8(x, norm_w, w, s, eps=1e-5, block=[1, 32], act={"mode": "none"}), "act: expected"),
        (lambda: norm_linear_fp8(x, norm_w[:49], w, s, eps=1e-5, block=[1, 32], act=act), "norm_weight: expected shape"),
        (lambda: norm_linear_fp8(x, norm_w.long(), w, s, eps=1e-5, block=[1, 32], act=act), "norm_weight: dtype"),
        (lambda: norm_linear_fp8(x, norm_w, w, s, eps=-1.0, block=[1, 32], act=act), "eps: expected"),
        (lambda: norm_linear_fp8(x, norm_w, w, s, eps=1e-5, block=[1, 32], act=act, sizes=[10, 8]), "sizes:"),
        (lambda: norm_linear_fp8(x[:, :40], norm_w[:40], w, s, eps=1e-5, block=[1, 32], act=act), "match x's K"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()

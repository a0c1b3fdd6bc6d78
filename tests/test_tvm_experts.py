"""The fused few-token experts kernel (targets/tvm/experts.py) against the reference experts.

Reference: quantized.moe_experts_q (FP8) and moe.moe_experts (dense), which loop over experts in
ascending order and index_add their outputs. The kernel computes each (token, slot) pair on its own
and sums a token's slots in slot order, with the same activation quantization (bit-identical, see
test_tvm_gemv.py) and the same weight decoding, so only fp32 summation order differs: tolerance
1e-5 x max|ref|. Measured on this machine (AMD EPYC, znver4): <= 5e-7.
"""

import pytest
import torch
import tvm  # noqa: F401  (apache-tvm: a test dependency)
import tvm_ffi

from v4c.runtime.kernels.moe import moe_experts
from v4c.runtime.kernels.quantized import moe_experts_q
from v4c.runtime.quant import quant_fp8
from v4c.targets.tvm import build_library
from v4c.targets.tvm.experts import experts_gemv

D, I, E, TOPK = 64, 48, 5, 3
ACT = {"mode": "dynamic", "group": 32, "scale_format": "fp32"}
CASES = {  # name -> (gate_up block, down block, scale format, act_in, act_mid, limit)
    "fp8_32x16": ((32, 16), (32, 16), "fp32", ACT, ACT, 10.0),
    "fp8_1x32_ue8m0": ((1, 32), (1, 32), "ue8m0", ACT, {"mode": "static", "scale": 0.02}, None),
    "fp8_noact": ((32, 32), (32, 32), "fp32", {"mode": "none"}, {"mode": "none"}, 0.5),
}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    funcs = [experts_gemv(D, I, TOPK, gate_up=("fp8", gu, sf), down=("fp8", dn, sf), act_in=a, act_mid=b, limit=lim,
                          name=name) for name, (gu, dn, sf, a, b, lim) in CASES.items()]
    funcs += [experts_gemv(D, I, TOPK, gate_up=("dense", dt), down=("dense", dt), limit=7.0, name=f"dense_{dt}")
              for dt in ("float32", "bfloat16")]
    return tvm_ffi.load_module(str(build_library(funcs, tmp_path_factory.mktemp("tvm") / "experts.so")))


def _routing(m, g):
    idx = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(m)])
    idx[0, 1] = idx[0, 0] if m > 1 else idx[0, 1]  # a repeated expert within a token's slots
    return torch.rand(m, TOPK, generator=g), idx


@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("case", list(CASES))
def test_fp8_experts_match_the_reference(lib, case, m):
    gu_block, dn_block, sf, act_in, act_mid, limit = CASES[case]
    g = torch.Generator().manual_seed(m)
    gu = [quant_fp8(torch.randn(2 * I, D, generator=g) * 0.1, gu_block, sf) for _ in range(E)]
    dn = [quant_fp8(torch.randn(D, I, generator=g) * 0.1, dn_block, sf) for _ in range(E)]
    qgu, sgu = (torch.stack(t) for t in zip(*gu))
    qdn, sdn = (torch.stack(t) for t in zip(*dn))
    x = torch.randn(m, D, generator=g)
    w, idx = _routing(m, g)
    ref = moe_experts_q(x[None], w[None], idx[None], qgu, sgu, qdn, sdn, format="fp8", block=list(gu_block),
                        down_block=list(dn_block), act_in=act_in, act_mid=act_mid, limit=limit)[0]
    out = torch.full((m, D), float("nan"))
    raw = [t.view(torch.uint8) if t.dtype != torch.float32 else t for t in (qgu, sgu, qdn, sdn)]
    lib[case](x, w, idx, *raw, out)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_experts_match_the_reference(lib, dtype):
    g = torch.Generator().manual_seed(7)
    wdt = getattr(torch, dtype)
    gu, dn = torch.randn(E, 2 * I, D, generator=g).to(wdt), torch.randn(E, D, I, generator=g).to(wdt)
    x = torch.randn(4, D, generator=g)
    w, idx = _routing(4, g)
    ref = moe_experts(x[None], w[None], idx[None], gu, dn, limit=7.0)[0]
    out = torch.full((4, D), float("nan"))
    lib[f"dense_{dtype}"](x, w, idx, gu, dn, out)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_rows_that_straddle_scale_blocks_are_refused():
    with pytest.raises(ValueError, match="multiple of the weight block"):
        experts_gemv(D, I, TOPK, gate_up=("fp8", (128, 128), "fp32"), down=("fp8", (32, 32), "fp32"))

"""FP4 e2m1 experts' code dots (targets/triton/kernels/moe.py _fp4_dot: bf16 tensor-core dots over the
activations' e4m3 codes on a GPU, fp32 dots of the same values under the interpreter) and their launch heuristic.
Helpers and tolerances: test_triton_moe.py; the GPU branch: test_triton_native.py."""

import pytest

from test_triton_moe import DYN_WIDE, EXPERTS_RTOL, STATIC, assert_close, problem, quantized
from v4c.runtime.kernels.quantized import moe_experts_q as ref_experts_q
from v4c.targets.triton.kernels import moe
from v4c.targets.triton.kernels.moe_quant import moe_experts_q


@pytest.mark.parametrize("act_in, act_mid", [({"mode": "dynamic", "group": 32, "scale_format": "ue8m0"}, STATIC),
                                            (STATIC, {"mode": "dynamic", "group": 64}), (DYN_WIDE, DYN_WIDE)])
def test_fp4_code_dots_and_fp32_dots_agree(act_in, act_mid):
    """FP4 experts with quantized activations: FP8_DOT takes dots over the activations' e4m3 codes (_fp4_dot: a
    weight byte's two nibbles against the even and odd columns), the scale after; within the reference's
    tolerance of the fp32 dots over fake-quantized tiles. A group that starts a chunk at an odd column cannot."""
    x, weights, idx, gate_up, down = problem(2, 5, 96, 64, 4, 2, seed=16)
    q = quantized(gate_up, down, "fp4", None, None, "ue8m0")
    kw = {"format": "fp4", "block": None, "down_block": None, "act_in": act_in, "act_mid": act_mid, "limit": 0.9}
    ref = ref_experts_q(x, weights, idx, *q, **kw)
    for fp8_dot in (True, False):
        assert_close(moe_experts_q(x, weights, idx, *q, **kw, config={"FP8_DOT": fp8_dot}), ref, EXPERTS_RTOL)
    assert moe._fp8_dot_applies(moe._weight(q[0], q[1], "fp4", (1, 32)), moe._act("act", act_in, 96, 32), 96)
    with pytest.raises(ValueError, match="an FP4 one starting at an even column"):
        moe_experts_q(x, weights, idx, *q, **{**kw, "act_in": {"mode": "dynamic", "group": 33}},
                      config={"FP8_DOT": True})


def test_fp4_experts_have_their_own_prefill_heuristic():
    """At prefill FP4 experts take N tiles of 64 (with the FP8 experts' 128 their gate_up spills on sm_90a), first
    among the tuning candidates too; decode and every other op keep theirs. The tuner times FP4 experts over their
    own candidates (those of the expert grid that compile without spills; the slow test_bench_triton.py checks)."""
    from v4c.targets.triton.configs import CANDIDATES, CANDIDATES_FP4, candidates, heuristic
    fp8, fp4 = heuristic("moe_experts_q", {"format": "fp8"}), heuristic("moe_experts_q_shared", {"format": "fp4"})
    assert fp4[0] == fp8[0] and fp8[1]["config"]["BLOCK_N"] == 128
    assert fp4[1]["config"] == {**fp8[1]["config"], "BLOCK_N": 64}
    assert candidates("moe_experts_q", "prefill", {"format": "fp4"})[0] == fp4[1]["config"]
    assert heuristic("linear_fp8", {"format": "fp4"}) == heuristic("linear_fp8")
    for bucket, first in zip(("decode", "prefill"), fp4):
        tried = candidates("moe_experts_q_shared", bucket, {"format": "fp4"})
        assert tried[0] == first["config"] and all(c in CANDIDATES_FP4[bucket] for c in tried[1:])
        assert all(c in CANDIDATES[bucket]["experts"] for c in CANDIDATES_FP4[bucket])  # a subset of the grid
        assert candidates("moe_experts_q", bucket, {"format": "fp8"})[1:] == [
            c for c in CANDIDATES[bucket]["experts"] if c != fp8[0 if bucket == "decode" else 1]["config"]]
    assert len(CANDIDATES_FP4["decode"]) == 6 and len(CANDIDATES_FP4["prefill"]) == 4

"""moe_experts_q_shared (targets/triton/kernels/moe_quant.py): the routed experts with a shared expert of its own
FP8 weights as expert E, in the same two launches, under TRITON_INTERPRET=1 (conftest). Tolerance against the
torch reference (runtime/kernels/quantized.py): 1e-5 x max|ref|, as the other expert kernels'. Where the shared
expert's weights could also stack with FP8 experts, both launchers give the same bits: expert E's tiles run the
same K loop over the same bytes, from its own tensor instead of the stacked one."""

import inspect

import pytest
import torch

from test_triton_moe import DYN, DYN_UE, DYN_WIDE, NONE, STATIC, EXPERTS_RTOL, assert_close, gen, problem, quantized
from v4c.ir.ops import OPS
from v4c.runtime.kernels.quantized import moe_experts_q as ref_experts_q
from v4c.runtime.kernels.quantized import moe_experts_q_shared as ref_shared
from v4c.runtime.quant import quant_fp8
from v4c.targets.triton.kernels import LAUNCHERS
from v4c.targets.triton.kernels.moe_quant import moe_experts_q, moe_experts_q_shared

D, INTER, E = 64, 34, 5


def routed_with_shared(tokens, k, seed):
    """A problem whose tokens route k experts, then the shared one (id E, weight 1), as the router's `shared`
    slot gives them."""
    x, weights, idx, gate_up, down = problem(1, tokens, D, INTER, E, k, seed=seed)
    idx = torch.cat([idx, torch.full_like(idx[..., :1], E)], -1)
    weights = torch.cat([weights, torch.ones_like(weights[..., :1])], -1)
    return x, weights, idx, gate_up, down


def shared_weights(block, down_block, scale_format, seed=21):
    g = gen(seed)
    gate_up = torch.randn(2 * INTER, D, generator=g) / D ** 0.5
    down = torch.randn(D, INTER, generator=g) / INTER ** 0.5
    return (*quant_fp8(gate_up, block, scale_format), *quant_fp8(down, down_block, scale_format)), (gate_up, down)


CASES = [  # experts (fmt, block, down_block, scale format), shared (block, down_block, scale format), acts, limit
    (("fp4", None, None, "ue8m0"), ([32, 16], [16, 32], "fp32"), DYN, STATIC, None),
    (("fp4", None, None, "ue8m0"), ([128, 128], [128, 128], "ue8m0"), DYN_UE, DYN_WIDE, 0.7),
    (("fp8", [32, 16], [16, 32], "ue8m0"), ([17, 8], [7, 5], "fp32"), NONE, DYN, 1.2),
]


@pytest.mark.parametrize("experts, shared, act_in, act_mid, limit", CASES)
@pytest.mark.parametrize("tokens, config", [(3, {}), (3, {"PAIRS_IN_KERNEL": False, "SUM_IN_KERNEL": False}),
                                            (22, {"BLOCK_M": 32})])
def test_shared_expert_matches_reference(experts, shared, act_in, act_mid, limit, tokens, config):
    """A decode step (pairs sorted in gate_up, combined in down), the separate pair and combine launches, and a
    prefill of 22 tokens (66 pairs: dynamic activations quantized once, QUANT_ONCE auto)."""
    fmt, block, down_block, scale_format = experts
    x, weights, idx, gate_up, down = routed_with_shared(tokens, 2, seed=tokens)
    idx[0, 1, :2] = torch.tensor([4, 4])  # one expert twice for a token (hash tables may repeat)
    q = quantized(gate_up, down, fmt, block, down_block, scale_format)
    own, _ = shared_weights(*shared)
    kw = {"format": fmt, "block": block, "down_block": down_block, "shared_block": shared[0],
          "shared_down_block": shared[1], "act_in": act_in, "act_mid": act_mid, "limit": limit}
    ref = ref_shared(x, weights, idx, *q, *own, **kw)
    assert_close(moe_experts_q_shared(x, weights, idx, *q, *own, **kw, config=config), ref, EXPERTS_RTOL)
    routed = {k: v for k, v in kw.items() if not k.startswith("shared_")}
    without = ref_experts_q(x, weights[..., :2], idx[..., :2], *q, **routed)
    assert float((ref - without).abs().max()) > 0.1 * float(ref.abs().max())  # the shared expert counts


@pytest.mark.parametrize("fp8_dot", [False, True])
def test_stacked_and_own_shared_weights_give_the_same_bits(fp8_dot):
    """FP8 experts and a shared expert of their blocks: moe_experts_q over the stacked weights (what the lowering
    does then) and moe_experts_q_shared over the shared expert's own give the same output bit for bit (the fp8
    tensor-core dot path too, where the interpreter emulates it)."""
    block = [32, 32]
    x, weights, idx, gate_up, down = routed_with_shared(4, 2, seed=30)
    act_in, act_mid = {"mode": "dynamic", "group": 32, "scale_format": "ue8m0"}, {"mode": "dynamic", "group": 32}
    q = quantized(gate_up, down, "fp8", block, block, "ue8m0")
    own, (sgu, sdn) = shared_weights(block, block, "ue8m0")
    stacked = (torch.cat([q[0], own[0][None]]), torch.cat([q[1], own[1][None]]), torch.cat([q[2], own[2][None]]),
               torch.cat([q[3], own[3][None]]))
    kw = {"format": "fp8", "block": block, "down_block": block, "act_in": act_in, "act_mid": act_mid, "limit": 0.9}
    config = {"FP8_DOT": fp8_dot}
    try:
        together = moe_experts_q(x, weights, idx, *stacked, **kw, config=config)
    except ValueError as e:  # FP8_DOT true needs an sm_89+ GPU
        assert fp8_dot and "FP8_DOT" in str(e)
        config, together = {"FP8_DOT": False}, moe_experts_q(x, weights, idx, *stacked, **kw)
    apart = moe_experts_q_shared(x, weights, idx, *q, *own, **kw, shared_block=block, shared_down_block=block,
                                 config=config)
    assert torch.equal(apart, together)


def fp4_problem(tokens, seed):
    """FP4 experts with a shared expert of 16 x 16 fp32-scaled blocks -> (x, weights, idx, q, own, kw)."""
    x, weights, idx, gate_up, down = routed_with_shared(tokens, 2, seed=seed)
    q = quantized(gate_up, down, "fp4", None, None, "ue8m0")
    own, _ = shared_weights([16, 16], [16, 16], "fp32")
    kw = {"format": "fp4", "block": None, "down_block": None, "shared_block": [16, 16], "shared_down_block": [16, 16],
          "act_in": DYN, "act_mid": DYN}
    return x, weights, idx, q, own, kw


def test_an_empty_batch_and_tokens_without_the_shared_slot():
    x, weights, idx, q, own, kw = fp4_problem(5, seed=31)
    idx[0, 2, 2], idx[0, 4, 0] = 1, E  # a token without the shared expert, one with it first
    assert_close(moe_experts_q_shared(x, weights, idx, *q, *own, **kw), ref_shared(x, weights, idx, *q, *own, **kw),
                 EXPERTS_RTOL)
    empty = moe_experts_q_shared(x[:, :0], weights[:, :0], idx[:, :0], *q, *own, **kw)
    assert empty.shape == (1, 0, D) and empty.dtype == torch.float32


def test_bad_shared_weights_are_named():
    x, weights, idx, q, own, kw = fp4_problem(2, seed=32)
    cases = [
        ((*q, own[0][None], *own[1:]), kw, "^shared_gate_up: expected 2 dimensions"),
        ((*q, own[0].view(torch.uint8), *own[1:]), kw, "^shared_gate_up: dtype"),
        ((*q, *own[:2], own[2][:, :32].contiguous(), own[3][:, :2].contiguous()), kw, "^shared_down: expected shape"),
        ((*q, *own), {**kw, "shared_block": [16]}, "^shared_block: expected"),
        ((*q, *own[:3], own[3][:, :1].contiguous()), kw, "^shared_down_scale: expected shape"),
        ((*q, *own), {**kw, "format": "fp6"}, "format 'fp6'"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            moe_experts_q_shared(x, weights, idx, *args, **kwargs)
    other = problem(1, 2, D, INTER + 2, E, 2, seed=33)
    q2 = quantized(other[3], other[4], "fp4", None, None, "ue8m0")
    with pytest.raises(ValueError, match="shared expert: expected D 64 and intermediate size 36"):
        moe_experts_q_shared(x, weights, idx, *q2, *own, **kw)


def test_the_launcher_takes_the_reference_signature():
    params = dict(inspect.signature(moe_experts_q_shared).parameters)
    assert list(params)[-2:] == ["config", "into"]
    del params["config"], params["into"]
    assert list(params.values()) == list(inspect.signature(ref_shared).parameters.values())
    assert LAUNCHERS["moe_experts_q_shared"] is moe_experts_q_shared and "moe_experts_q_shared" in OPS

"""The fused attention launchers (targets/triton/kernels/attention_fused.py: attention_rope and
norm_attention_rope, the fuse pass's) under the interpreter: the same bits as the separate launches (the norm /
RoPE kernels, then attention), within fp32 tolerance of the torch kernels, and clear errors for bad norms and
RoPE. Helpers and tolerances: test_triton_attention.py."""

import pytest
import torch

from test_triton_attention import TOL, _garbage_storage, _no_launch, clone, make_case
from v4c.runtime.kernels.attention import attention_rope as ref_attention_rope
from v4c.runtime.kernels.attention import norm_attention_rope as ref_norm_attention_rope
from v4c.targets.triton.kernels import attention as module
from v4c.targets.triton.kernels.attention import attention
from v4c.targets.triton.kernels.attention_fused import attention_rope, norm_attention_rope
from v4c.targets.triton.kernels.norm import rms_norm_rope as rope_norm_kernel
from v4c.targets.triton.kernels.norm import rope as rope_kernel


# --- the output RoPE in the attention launch (attention_rope, the fuse pass's) --------------------------------
@pytest.mark.parametrize("mode", ["sliding", "csa", "hca"])
@pytest.mark.parametrize("config", [{"SPLIT_KV": 1}, {"BLOCK_N": 16, "SPLIT_KV": 3},
                                    {"BLOCK_N": 16, "SPLIT_KV": 3, "SUM_IN_KERNEL": False}],
                         ids=["one-run", "split-last-run", "split-combine-kernel"])
def test_attention_rope_is_attention_then_the_rope_kernel(mode, config):
    """One launch: the attention output with RoPE on its rows' trailing channels (inverse, and forward with a
    scale), bit for bit the attention then the rope kernel (outputs and ring), at an int and a device position,
    each row roped by the program that finishes it: the single run, the last run to arrive, or the combine
    kernel; and within the reference's tolerance. Decode past the window, and a prefill whose tokens each have
    their own position."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8)  # 4 pairs: the last 8 of the 70 channels
    for batch, s, window, pos0, seed in [(2, 1, 40, 60, 51), (1, 6, 20, 3, 52)]:
        (q, kv, sinks, selected), state, kwargs = make_case("fp8_split", batch, s, window, pos0, mode, seed=seed,
                                                            capacity=40)
        positions = torch.arange(pos0, pos0 + s)
        for out_rope in ({"inverse": True}, {"scale": 0.8}):
            for pos in (pos0, torch.tensor([pos0, 7])):
                fused_state, apart_state = clone(state), clone(state)
                call = dict(kwargs, pos0=pos, config=config)
                ours = attention_rope(q, kv, sinks, positions, inv_freq, selected, state=fused_state, **call,
                                      out_rope=out_rope)
                apart = attention(q, kv, sinks, selected, state=apart_state, **call)
                assert torch.equal(ours, rope_kernel(apart, positions, inv_freq, **out_rope))
                assert all(torch.equal(a, b) for a, b in zip(fused_state, apart_state, strict=True))
            ref = ref_attention_rope(q, kv, sinks, positions, inv_freq, selected, state=clone(state), **kwargs,
                                     out_rope=out_rope)
            assert float((ours - ref).abs().max() / ref.abs().max()) <= TOL


@pytest.mark.parametrize("mode", ["sliding", "csa", "hca"])
@pytest.mark.parametrize("config", [{"SPLIT_KV": 1}, {"BLOCK_N": 16, "SPLIT_KV": 3},
                                    {"BLOCK_N": 16, "SPLIT_KV": 3, "SUM_IN_KERNEL": False}],
                         ids=["one-run", "split-last-run", "split-combine-kernel"])
def test_norm_attention_rope_is_the_two_norms_then_attention_rope(mode, config, monkeypatch):
    """One launch in a decode step: the raw queries and keys normed and roped by the attention programs (the keys
    where they encode them, up to 4 new tokens), bit for bit the rms_norm_rope kernel on each then attention_rope
    (outputs and ring), at an int and a device position, with a RoPE scale and an inverse one; from 5 tokens on the
    launcher runs the rms_norm_rope kernel on the keys first. Within the reference's tolerance. Decode past the
    window, 3 new tokens, and a prefill of 6 (each with its own position)."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8)  # 4 pairs: the 8 RoPE channels of the 70
    weight = torch.rand(70, generator=torch.Generator().manual_seed(5)) + 0.5
    # (the keys are stored as fp8: an eps to tell apart from the query's needs to be large)
    norms = {"q_norm": {"eps": 1e-6}, "kv_norm": {"eps": 0.25, "scale": 0.9, "inverse": True}}
    for batch, s, window, pos0, seed in [(2, 1, 40, 60, 71), (2, 3, 5, 9, 72), (1, 6, 20, 3, 73)]:
        (q, kv, sinks, selected), state, kwargs = make_case("fp8_split", batch, s, window, pos0, mode, seed=seed,
                                                            capacity=40, heads=19, dims=(70, 8))
        positions = torch.arange(pos0, pos0 + s)
        qn = rope_norm_kernel(q, positions, inv_freq, **norms["q_norm"])
        kn = rope_norm_kernel(kv, positions, inv_freq, weight, **norms["kv_norm"])
        for pos in (pos0, torch.tensor([pos0, 7])):
            fused_state, apart_state = clone(state), clone(state)
            call = dict(kwargs, pos0=pos, config={**config, "DOT": "ieee"}, out_rope={"inverse": True})
            with monkeypatch.context() as m:
                if s <= 4:
                    m.setattr(module, "rms_norm_rope", _no_launch)
                    m.setattr(module, "encode_kv", _no_launch)
                _garbage_storage(m)
                ours = norm_attention_rope(q, kv, weight, sinks, positions, inv_freq, selected, state=fused_state,
                                           **call, **norms)
            apart = attention_rope(qn, kn, sinks, positions, inv_freq, selected, state=apart_state, **call)
            assert torch.equal(ours, apart), (batch, s, pos)
            assert all(torch.equal(a, b) for a, b in zip(fused_state, apart_state, strict=True)), (batch, s, pos)
        ref = ref_norm_attention_rope(q, kv, weight, sinks, positions, inv_freq, selected, state=clone(state),
                                      **kwargs, out_rope={"inverse": True}, **norms)
        assert float((ours - ref).abs().max() / ref.abs().max()) <= TOL


def test_norm_attention_rope_with_bf16_inputs():
    """bf16 raw queries, keys and norm weight (the kernel reads them as bf16, its normed rows are fp32): the
    rms_norm_rope kernel on each, then attention_rope, bit for bit."""
    (q, kv, sinks, selected), state, kwargs = make_case("fp8_split", 2, 1, 40, 60, "csa", seed=74, capacity=40,
                                                        heads=5, dims=(70, 8), dtype=torch.bfloat16)
    inv_freq, positions = 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8), torch.arange(60, 61)
    weight = (torch.rand(70, generator=torch.Generator().manual_seed(6)) + 0.5).bfloat16()
    fused_state, apart_state = clone(state), clone(state)
    ours = norm_attention_rope(q, kv, weight, sinks, positions, inv_freq, selected, state=fused_state, **kwargs,
                               out_rope={"inverse": True}, q_norm={"eps": 1e-6}, kv_norm={"eps": 1e-6})
    apart = attention_rope(rope_norm_kernel(q, positions, inv_freq, eps=1e-6),
                           rope_norm_kernel(kv, positions, inv_freq, weight, eps=1e-6), sinks, positions, inv_freq,
                           selected, state=apart_state, **kwargs, out_rope={"inverse": True})
    assert torch.equal(ours, apart)
    assert all(torch.equal(a, b) for a, b in zip(fused_state, apart_state, strict=True))


def test_norm_attention_rope_checks_its_norms():
    (q, kv, sinks, selected), state, kwargs = make_case("fp8_split", 1, 2, 3, 4, "csa", dims=(70, 8))
    args = dict(positions=torch.arange(4, 6), inv_freq=torch.ones(4), kv_weight=torch.ones(70),
                q_norm={"eps": 1e-6}, kv_norm={"eps": 1e-6})
    cases = [
        (dict(q_norm={"inverse": True}), r"q_norm: expected an rms_norm_rope's attributes \{eps, inverse\?, scale\?\}"),
        (dict(kv_norm={"eps": 1e-6, "theta": 2}), "kv_norm: expected an rms_norm_rope's attributes"),
        (dict(kv_weight=torch.ones(69)), r"weight: expected shape \[70\]"),
        (dict(positions=torch.arange(3)), r"positions: expected \[2\] \(one per token\)"),
    ]
    for changes, message in cases:
        call = {**args, **changes}
        with pytest.raises(ValueError, match=message):
            norm_attention_rope(q, kv, call.pop("kv_weight"), sinks, call.pop("positions"), call.pop("inv_freq"),
                                selected, state=clone(state), **kwargs, out_rope={}, **call)


def test_attention_rope_checks_its_rope():
    (q, kv, sinks, selected), state, kwargs = make_case("fp8_split", 1, 2, 3, 4, "csa")
    positions, inv_freq = torch.arange(4, 6), torch.ones(4)
    cases = [
        (dict(out_rope={"inverse": True, "theta": 1}), "out_rope: expected the rope's attributes"),
        (dict(positions=positions[:1]), r"positions: expected \[2\] \(one per token\)"),
        (dict(positions=positions.float()), "positions: dtype"),
        (dict(inv_freq=torch.ones(36)), "inv_freq: 36 pairs do not fit 70 channels"),
    ]
    for change, message in cases:
        call = {"positions": positions, "inv_freq": inv_freq, "selected": selected, "state": state, **kwargs,
                "out_rope": {"inverse": True}, **change}
        with pytest.raises(ValueError, match=message):
            attention_rope(q, kv, sinks, **call)

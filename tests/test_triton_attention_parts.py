"""The attention kernel's value parts (config V_SPLIT: each program accumulates 1 / V_SPLIT of the output channels,
so it can hold more heads) under the interpreter: within fp32 tolerance of the torch kernel with its state bit for
bit, the in-kernel merge of split runs bit for bit the combine kernel's, the output RoPE by the last part, and clear
errors for parts the kernel cannot take. Helpers and tolerances: test_triton_attention.py."""

import pytest
import torch

from test_triton_attention import FORMATS, _fused_is_apart, check_against_reference, clone, make_case
from v4c.targets.triton.kernels.attention import attention
from v4c.targets.triton.kernels.attention_fused import attention_rope
from v4c.targets.triton.kernels.norm import rope as rope_kernel


@pytest.mark.parametrize("mode", ["sliding", "csa", "hca"])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("split", [1, 3])
def test_value_parts_match_the_reference(fmt, mode, split):
    """Two parts (fp8_split's 70 channels: parts of 64, one UE8M0 group each at a group boundary; f32 / bf16:
    parts of 16), one run or three: decode past the window, and a prefill with empty early runs."""
    for batch, s, window, pos0, seed in [(2, 1, 40, 60, 71), (1, 6, 20, 3, 72)]:
        args, state, kwargs = make_case(fmt, batch, s, window, pos0, mode, seed=seed, capacity=40)
        check_against_reference(args, state, kwargs, config={"V_SPLIT": 2, "BLOCK_N": 16, "SPLIT_KV": split})


def test_four_value_parts_of_a_wider_head():
    """fp8_split keys of 256 channels (7 RoPE) in four parts of 64: every part's scale groups read at its offset."""
    for mode in ("csa", "hca"):
        args, state, kwargs = make_case("fp8_split", 2, 2, 9, 30, mode, seed=73, capacity=40, dims=(256, 8))
        check_against_reference(args, state, kwargs, config={"V_SPLIT": 4, "BLOCK_N": 16, "SPLIT_KV": 2})


@pytest.mark.parametrize("split", [1, 3])
def test_value_parts_finish_in_the_kernel_as_the_combine_kernel(split, monkeypatch):
    """SUM_IN_KERNEL with two parts: the last of a (query, head block)'s SPLIT x 2 programs merges every part's
    channels, and the last of a batch row's programs writes the ring, bit for bit as the combine and ring launches."""
    for batch, s, window, pos0, seed in [(2, 1, 40, 60, 74), (1, 6, 40, 30, 75)]:
        args, state, kwargs = make_case("fp8_split", batch, s, window, pos0, "csa", seed=seed, capacity=40, heads=19)
        config = {"V_SPLIT": 2, "BLOCK_N": 16, "BLOCK_H": 16, "SPLIT_KV": split, "DOT": "ieee"}
        for pos in (pos0, torch.tensor([pos0, 7])):
            _fused_is_apart(args, state, dict(kwargs, pos0=pos), {**config, "SUM_IN_KERNEL": False},
                            {**config, "SUM_IN_KERNEL": True}, ["_combine_kernel", "_write_ring"], monkeypatch)


@pytest.mark.parametrize("split", [1, 3])
def test_the_last_value_part_ropes_the_output(split):
    """attention_rope with two parts: the RoPE channels (the last 6 of 70) lie in the second part, whose program (or
    the merging one) ropes them: bit for bit attention then the rope kernel."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 6, 2) / 6)
    (q, kv, sinks, selected), state, kwargs = make_case("fp8_split", 2, 1, 40, 60, "csa", seed=76, capacity=40)
    positions = torch.tensor([60])
    call = dict(kwargs, config={"V_SPLIT": 2, "BLOCK_N": 16, "SPLIT_KV": split})
    fused_state, apart_state = clone(state), clone(state)
    ours = attention_rope(q, kv, sinks, positions, inv_freq, selected, state=fused_state, **call,
                          out_rope={"inverse": True})
    apart = attention(q, kv, sinks, selected, state=apart_state, **call)
    assert torch.equal(ours, rope_kernel(apart, positions, inv_freq, inverse=True))
    assert all(torch.equal(a, b) for a, b in zip(fused_state, apart_state, strict=True))


def test_rejects_parts_the_kernel_cannot_take():
    args, state, kwargs = make_case("fp8_split", 1, 1, 3, 3, "csa")
    with pytest.raises(ValueError, match=r"V_SPLIT.*expected 1, 2 or 4, got 3"):
        attention(*args, state=clone(state), **kwargs, config={"V_SPLIT": 3})
    with pytest.raises(ValueError, match=r"fp8_split keys need parts of a multiple of 64 channels .*, got 32"):
        attention(*args, state=clone(state), **kwargs, config={"V_SPLIT": 4})
    with pytest.raises(ValueError, match=r"RoPE channels \[62, 70\) must lie in the last part \[64, 128\)"):
        attention_rope(*args[:3], torch.tensor([3]), 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8), args[3],
                       state=clone(state), **kwargs, out_rope={}, config={"V_SPLIT": 2})
    args, state, kwargs = make_case("f32", 1, 1, 3, 3, "sliding")
    with pytest.raises(ValueError, match=r"parts of 8 channels, under the 16 a tl.dot tile needs"):
        attention(*args, state=clone(state), **kwargs, config={"V_SPLIT": 4})


@pytest.mark.parametrize("mode", ["sliding", "csa", "hca"])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("config", [{"QK_CHUNK": 16}, {"QK_CHUNK": 16, "V_SPLIT": 2, "SPLIT_KV": 3}],
                         ids=["chunks", "chunks-parts-split"])
def test_score_chunks_match_the_reference(fmt, mode, config):
    """QK_CHUNK: the scores summed over chunks of channels, the queries read a chunk at a time (fp8_split: chunks of
    64 of its 70 channels, a scale group each; f32 / bf16: of 16), alone and with value parts and a split."""
    if fmt == "fp8_split":
        config = {**config, "QK_CHUNK": 64}
    for batch, s, window, pos0, seed in [(2, 1, 40, 60, 77), (1, 6, 20, 3, 78)]:
        args, state, kwargs = make_case(fmt, batch, s, window, pos0, mode, seed=seed, capacity=40)
        check_against_reference(args, state, kwargs, config={**config, "BLOCK_N": 16})


def test_score_chunks_in_the_fused_launches():
    """norm_attention_rope with score chunks: the queries are read back chunk by chunk from the normed rows the
    programs wrote (past L1), bit for bit the separate launches with the same chunks."""
    from test_triton_attention_fused import test_norm_attention_rope_is_the_two_norms_then_attention_rope as fused
    fused("csa", {"BLOCK_N": 16, "QK_CHUNK": 64, "SPLIT_KV": 3}, pytest.MonkeyPatch())


def test_rejects_chunks_the_kernel_cannot_take():
    args, state, kwargs = make_case("fp8_split", 1, 1, 3, 3, "csa")
    with pytest.raises(ValueError, match=r"QK_CHUNK.*a power of two >= 16, got 24"):
        attention(*args, state=clone(state), **kwargs, config={"QK_CHUNK": 24})
    with pytest.raises(ValueError, match=r"QK_CHUNK.* 32: fp8_split keys need chunks of a multiple of 64 channels"):
        attention(*args, state=clone(state), **kwargs, config={"QK_CHUNK": 32})

"""The Triton `attention` launcher (interpreter) against the runtime's torch kernel: outputs within
fp32 tolerance, ring / state bit-identical, for every KV format, sliding / CSA / HCA, prefill and
decode, tiered entry stores; and clear errors for unsupported input."""

import pytest
import torch
from v4c.runtime.kernels.attention import attention as ref_attention
from v4c.runtime.kv_tiers import PagedEntries, PagePool, TierAllocator, TierStats
from v4c.runtime.quant import encode_entries, entry_layout
from v4c.targets.triton.kernels import attention as module
from v4c.targets.triton.kernels import LAUNCHERS, common
from v4c.targets.triton.kernels.attention import attention, encode_kv
from v4c.targets.triton.kernels.attention_fused import attention_rope

TOL = 1e-5  # max |ours - ref| / max |ref|
FORMATS = {"f32": (19, 0), "bf16": (21, 5), "fp8_split": (70, 4)}  # kv_format -> (head dim, rope channels)
RATE, CAPACITY, TOPK = 3, 9, 5


def randn(g, *shape):
    return torch.randn(*shape, generator=g)


def make_case(fmt, batch, s, window, pos0, mode, seed=0, heads=3, dtype=torch.float32, capacity=CAPACITY, dims=None):
    """Inputs and a state for one call; selected has duplicates and -1 picks. dims: (head dim, rope channels)
    instead of the format's."""
    g = torch.Generator().manual_seed(seed)
    d, rope = dims or FORMATS[fmt]
    q, kv, sinks = randn(g, batch, s, heads, d).to(dtype), randn(g, batch, s, d).to(dtype), randn(g, heads).to(dtype)
    state = [encode(randn(g, batch, window - 1, d), fmt, rope)]
    if mode != "sliding":
        state.append(encode_entries(randn(g, batch, capacity, d) * 2, fmt, rope))
    selected = None
    if mode == "csa":
        selected = torch.randint(-1, capacity, (batch, s, TOPK), generator=g)
        selected[:, :, -1] = -1
    kwargs = {"pos0": pos0, "window": window, "rate": RATE if mode != "sliding" else 0, "scale": 0.37, "kv_format": fmt,
                  "rope_dim": rope}
    return (q, kv, sinks, selected), state, kwargs


def encode(x, fmt, rope):
    """quant.encode_entries, also for no rows (window 1)."""
    if x.shape[1]:
        return encode_entries(x, fmt, rope)
    dtype, width = entry_layout(fmt, x.shape[-1], rope)
    return torch.zeros(*x.shape[:-1], width, dtype={"f32": torch.float32, "bf16": torch.bfloat16, "u8": torch.uint8}[dtype])


def clone(state):
    return tuple(t.clone() for t in state)


def check_against_reference(args, state, kwargs, config=None, ours_state=None):
    """Runs both kernels on copies of `state`; compares outputs and the mutated states. Without
    `ours_state` (a tiered store), ours runs twice: pos0 an int, and a device position (the kernels read it; a
    split's runs then cover the most keys any position has, so its run boundaries, and rounding, may differ)."""
    ref_state = clone(state)
    ref = ref_attention(*args, state=ref_state, **kwargs)
    runs = [(kwargs["pos0"], ours_state or clone(state))]
    if ours_state is None:
        runs.append((torch.tensor([kwargs["pos0"], 7]), clone(state)))
    for pos0, our_state in runs:
        ours = attention(*args, state=our_state, **dict(kwargs, pos0=pos0), config=config)
        assert ours.shape == ref.shape and ours.dtype == torch.float32
        err = float((ours - ref).abs().max() / ref.abs().max())
        assert err <= TOL, f"relative error {err} (pos0 {pos0})"
        for mine, theirs in zip(our_state, ref_state):
            if isinstance(mine, torch.Tensor):
                assert torch.equal(mine, theirs), f"state differs from the reference's (pos0 {pos0})"
    return ours


CASES = [  # (batch, S, window, pos0): decode at the start, decode past the window, prefill, prefill continuing,
    (1, 1, 1, 0),  # and a continuing prefill whose new rows wrap around the end of the ring (rows 3, 0, 1 of 4)
    (2, 1, 5, 11),
    (2, 6, 4, 0),
    (1, 5, 3, 9),
    (2, 3, 5, 3),
]


@pytest.mark.parametrize("mode", ["sliding", "csa", "hca"])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("batch, s, window, pos0", CASES)
def test_matches_reference(fmt, mode, batch, s, window, pos0):
    args, state, kwargs = make_case(fmt, batch, s, window, pos0, mode, seed=batch * 100 + s * 10 + window)
    check_against_reference(args, state, kwargs)


@pytest.mark.parametrize("mode", ["sliding", "csa", "hca"])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("split", [2, 5])
def test_split_kv_runs_merge_to_the_reference(fmt, mode, split):
    """Flash-decoding: the key list cut into runs of 16 keys, merged by the combine kernel. Prefill's early
    queries see fewer keys than the last one, so some of their runs are empty (m = -inf, l = 0)."""
    for batch, s, window, pos0, seed in [(2, 1, 40, 60, 31), (1, 6, 20, 3, 32)]:
        args, state, kwargs = make_case(fmt, batch, s, window, pos0, mode, seed=seed, capacity=40)
        # DOT tf32 only checks the plumbing here: the interpreter computes every dot in fp32
        config = {"BLOCK_N": 16, "SPLIT_KV": split, "DOT": "tf32" if split == 5 else "ieee"}
        check_against_reference(args, state, kwargs, config=config)


def _no_launch(*args, **kwargs):
    raise AssertionError("launched though the attention kernel finishes in-kernel")


def _fused_is_apart(args, state, kwargs, apart_config, fused_config, launches, monkeypatch, garbage=False):
    """attention with `fused_config`, the module's `launches` failing if called (and with `garbage` the new keys'
    storage handed over full of garbage), equals attention with `apart_config`: outputs and states, bit for bit."""
    apart_state, fused_state = clone(state), clone(state)
    apart = attention(*args, state=apart_state, **kwargs, config=apart_config)
    with monkeypatch.context() as m:
        for name in launches:
            m.setattr(module, name, _no_launch)
        if garbage:
            _garbage_storage(m)
        fused = attention(*args, state=fused_state, **kwargs, config=fused_config)
    assert torch.equal(fused, apart), kwargs
    assert all(torch.equal(a, b) for a, b in zip(fused_state, apart_state, strict=True)), kwargs


@pytest.mark.parametrize("mode", ["sliding", "csa", "hca"])
@pytest.mark.parametrize("split", [1, 3])
def test_the_last_program_merges_the_runs_and_writes_the_ring(mode, split, monkeypatch):
    """SUM_IN_KERNEL (the default wherever there are arrival counters): the last run of each (query, head block) to
    arrive merges the runs and the last program of each batch row writes its new keys into the ring, without the
    combine and ring launches, bit for bit as they do; the counters are left zero. The interpreter runs the
    programs one after another, so a merge before the last run arrived would read runs not yet written, and a ring
    write before the row's last program would replace keys its later queries read. Cases: decode past the window,
    a prefill whose early queries have empty runs, a prefill of more tokens than ring rows."""
    for batch, s, window, pos0, seed in [(2, 1, 40, 60, 41), (1, 6, 40, 30, 42), (2, 5, 4, 9, 43)]:
        args, state, kwargs = make_case("fp8_split", batch, s, window, pos0, mode, seed=seed, capacity=40, heads=19)
        config = {"BLOCK_N": 16, "BLOCK_H": 16, "SPLIT_KV": split, "DOT": "ieee"}
        for pos in (pos0, torch.tensor([pos0, 7])):
            _fused_is_apart(args, state, dict(kwargs, pos0=pos), {**config, "SUM_IN_KERNEL": False},
                            {**config, "SUM_IN_KERNEL": True}, ["_combine_kernel", "_write_ring"], monkeypatch)
    assert not common.tile_counters(torch.device("cpu"), 1).any()


@pytest.mark.parametrize("split", [1, 2])
def test_in_kernel_finishing_uses_only_the_counters_it_asks_for(split, monkeypatch):
    """The launcher asks tile_counters for (query, head block) rows (when split) plus batch rows; the kernel must
    count arrivals in those and no further: here the device's counters are the first ones of a larger buffer whose
    rest holds a sentinel, which must stay, and the result is the separate launches'."""
    args, state, kwargs = make_case("f32", 2, 3, 40, 60, "sliding", seed=45)
    config = {"BLOCK_N": 16, "SPLIT_KV": split}
    expected_state = clone(state)
    expected = attention(*args, state=expected_state, **kwargs, config={**config, "SUM_IN_KERNEL": False})
    needed = (split > 1) * 2 * 3 + 2  # batch 2 x 3 queries x 1 head block, then 2 batch rows
    buffer = torch.full((64,), 7, dtype=torch.int32)
    buffer[:needed] = 0
    monkeypatch.setattr(common, "_COUNTERS", {torch.device("cpu"): buffer[:needed]})
    monkeypatch.setattr(common, "TILE_COUNTERS", needed)
    ours_state = clone(state)
    ours = attention(*args, state=ours_state, **kwargs, config={**config, "SUM_IN_KERNEL": True})
    assert torch.equal(ours, expected) and all(torch.equal(a, b) for a, b in zip(ours_state, expected_state))
    assert not buffer[:needed].any() and (buffer[needed:] == 7).all()


def test_finishing_in_the_kernel_needs_its_counters(monkeypatch):
    """Fewer arrival counters than (query, head block) rows plus batch rows: SUM_IN_KERNEL true names why it
    cannot, 'auto' launches the combine and ring kernels instead (the same result)."""
    args, state, kwargs = make_case("f32", 2, 3, 40, 60, "sliding", seed=44)
    config = {"BLOCK_N": 16, "SPLIT_KV": 2}
    expected_state = clone(state)
    expected = attention(*args, state=expected_state, **kwargs, config={**config, "SUM_IN_KERNEL": False})
    monkeypatch.setattr(common, "TILE_COUNTERS", 7)  # 2 x 3 rows of one head block, then 2 batch rows
    with pytest.raises(ValueError, match=r"SUM_IN_KERNEL.*at most 7 arrival counters \(8 here\)"):
        attention(*args, state=clone(state), **kwargs, config={**config, "SUM_IN_KERNEL": True})
    auto_state = clone(state)
    assert torch.equal(attention(*args, state=auto_state, **kwargs, config=config), expected)
    assert all(torch.equal(a, b) for a, b in zip(auto_state, expected_state))
    with pytest.raises(ValueError, match="SUM_IN_KERNEL"):
        attention(*args, state=clone(state), **kwargs, config={"SUM_IN_KERNEL": "yes"})


def _garbage_storage(monkeypatch):
    """The new keys' storage handed to the kernel full of 0x5a bytes, so a byte the kernel fails to encode shows."""
    storage_for = module.storage_for

    def filled(*args):
        out = storage_for(*args)
        out.view(torch.uint8).fill_(0x5A)
        return out
    monkeypatch.setattr(module, "storage_for", filled)


@pytest.mark.parametrize("mode", ["sliding", "csa", "hca"])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("config", [{"SPLIT_KV": 1}, {"SPLIT_KV": 3}, {"SPLIT_KV": 3, "SUM_IN_KERNEL": False}],
                         ids=["one-run", "split", "split-apart"])
def test_the_attention_programs_encode_the_new_keys(fmt, mode, config, monkeypatch):
    """ENCODE_IN_KERNEL (the default up to 4 new tokens): every program encodes its batch row's new keys itself,
    without the encode launch, bit for bit as the encode kernel does (outputs and ring, whether the last program
    or the launcher writes the ring), at an int and a device position; the storage it fills starts as garbage.
    Decode past the window, 4 new tokens at the start, 3 whose rows wrap around the ring (window 3)."""
    config = {**config, "BLOCK_N": 16, "DOT": "ieee"}
    for batch, s, window, pos0, seed in [(2, 1, 40, 60, 61), (1, 4, 40, 0, 62), (2, 3, 3, 5, 63)]:
        args, state, kwargs = make_case(fmt, batch, s, window, pos0, mode, seed=seed, capacity=40, heads=19)
        for pos in (pos0, torch.tensor([pos0, 7])):
            _fused_is_apart(args, state, dict(kwargs, pos0=pos), {**config, "ENCODE_IN_KERNEL": False}, config,
                            ["encode_kv"], monkeypatch, garbage=True)


def test_encoding_in_the_kernel_is_for_a_few_tokens():
    """Five new tokens: ENCODE_IN_KERNEL true names the limit, 'auto' launches the encode kernel (the same result)."""
    args, state, kwargs = make_case("fp8_split", 1, 5, 4, 3, "sliding", seed=64)
    with pytest.raises(ValueError, match=r"ENCODE_IN_KERNEL.*at most 4 new tokens a call \(here 5\)"):
        attention(*args, state=clone(state), **kwargs, config={"ENCODE_IN_KERNEL": True})
    auto_state, apart_state = clone(state), clone(state)
    assert torch.equal(attention(*args, state=auto_state, **kwargs),
                       attention(*args, state=apart_state, **kwargs, config={"ENCODE_IN_KERNEL": False}))
    assert all(torch.equal(a, b) for a, b in zip(auto_state, apart_state, strict=True))
    with pytest.raises(ValueError, match="ENCODE_IN_KERNEL"):
        attention(*args, state=clone(state), **kwargs, config={"ENCODE_IN_KERNEL": "yes"})


# bf16 dots (a GPU's default): q and the probabilities rounded to bf16 (2^-9 relative), which moves a logit s by
# up to |s| 2^-8; at these cases' logits (|s| up to ~10) that is up to ~1e-2 of the output scale (measured 1.1e-2)
BF16_TOL = 2.5e-2


@pytest.mark.parametrize("mode", ["sliding", "csa", "hca"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_bf16_dots_match_reference(fmt, mode):
    """DOT bf16, whole and split into runs: decode past the window, a prefill, a small window; the ring
    state stays bit-identical (the dots' precision does not touch storage)."""
    for batch, s, window, pos0, seed, cap in [(2, 1, 40, 60, 31, 40), (1, 6, 20, 3, 32, 40), (2, 6, 4, 0, 1, 9)]:
        args, state, kwargs = make_case(fmt, batch, s, window, pos0, mode, seed=seed, capacity=cap)
        ref_state = clone(state)
        ref = ref_attention(*args, state=ref_state, **kwargs)
        for split in (0, 3):
            our_state = clone(state)
            ours = attention(*args, state=our_state, **kwargs, config={"DOT": "bf16", "BLOCK_N": 16, "SPLIT_KV": split})
            err = float((ours - ref).abs().max() / ref.abs().max())
            assert err <= BF16_TOL, f"relative error {err} (split {split}, case {batch, s, window, pos0})"
            assert all(torch.equal(a, b) for a, b in zip(our_state, ref_state) if isinstance(a, torch.Tensor))


@pytest.mark.parametrize("dot", ["ieee", "bf16"])
def test_fp8_split_with_an_odd_nope_width(dot):
    """67 nope channels: the RoPE bf16 values start at an odd byte, so they are read as byte pairs instead of
    aligned int16s (the path every even width takes)."""
    g = torch.Generator().manual_seed(41)
    d, rope, heads, window = 71, 4, 3, 6
    q, kv, sinks = randn(g, 2, 3, heads, d), randn(g, 2, 3, d), randn(g, heads)
    state = [encode_entries(randn(g, 2, window - 1, d), "fp8_split", rope),
             encode_entries(randn(g, 2, CAPACITY, d), "fp8_split", rope)]
    kwargs = {"pos0": 20, "window": window, "rate": RATE, "scale": 0.3, "kv_format": "fp8_split", "rope_dim": rope}
    ref = ref_attention(q, kv, sinks, None, state=clone(state), **kwargs)
    ours = attention(q, kv, sinks, None, state=clone(state), **kwargs, config={"DOT": dot})
    assert float((ours - ref).abs().max() / ref.abs().max()) <= (TOL if dot == "ieee" else BF16_TOL)


@pytest.mark.parametrize("mode", ["sliding", "csa", "hca"])
@pytest.mark.parametrize("batch, s, window, pos0", CASES)
def test_fp8_split_with_word_aligned_scales(mode, batch, s, window, pos0):
    """128 nope + 8 RoPE channels (as V4's 448 + 64): the scale bytes start at an 8-byte boundary, so each row's
    scales are read as one 8-byte word (FORMATS' 70 / 4 reads them as bytes)."""
    d, rope = 136, 8
    assert (d - rope + 2 * rope) % 8 == 0 and entry_layout("fp8_split", d, rope)[1] % 8 == 0
    args, state, kwargs = make_case("fp8_split", batch, s, window, pos0, mode, seed=7 + s, dims=(d, rope))
    check_against_reference(args, state, kwargs)


def test_split_kv_with_a_minus_inf_sink():
    args, state, kwargs = make_case("f32", 1, 1, 40, 60, "hca", seed=33, capacity=40)
    args[2][0] = float("-inf")  # head 0 has no sink: run 0 starts empty as the others do
    ours = check_against_reference(args, state, kwargs, config={"BLOCK_N": 16, "SPLIT_KV": 3})
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_prefill_then_decode_chains_state(fmt):
    """A prefill then single-token steps: every output and every ring state matches the reference chain."""
    window, heads = 4, 2
    args, state, kwargs = make_case(fmt, 2, 9, window, 0, "hca", seed=5, heads=heads)
    q, kv, sinks, _ = args
    ref_state, our_state = clone(state), clone(state)
    for start, stop in [(0, 5), (5, 6), (6, 7), (7, 9)]:
        step = dict(kwargs, pos0=start)
        call = (q[:, start:stop], kv[:, start:stop], sinks, None)
        ref = ref_attention(*call, state=ref_state, **step)
        ours = attention(*call, state=our_state, **step)
        assert float((ours - ref).abs().max() / ref.abs().max()) <= TOL
        assert all(torch.equal(a, b) for a, b in zip(our_state, ref_state))


def test_all_selected_missing_and_low_precision_inputs():
    """CSA with every pick -1 (only window + sink), bf16 queries / keys / sinks, int32 picks, a narrow config."""
    args, state, kwargs = make_case("bf16", 2, 3, 2, 4, "csa", seed=9, dtype=torch.bfloat16)
    q, kv, sinks, selected = args
    check_against_reference((q, kv, sinks, torch.full_like(selected, -1)), state, kwargs)
    check_against_reference((q, kv, sinks, selected.int()), state, kwargs,
                            config={"BLOCK_H": 16, "BLOCK_N": 16, "num_warps": 2})


def test_fp8_ring_with_every_byte():
    """A ring holding arbitrary fp8_split bytes (every e4m3 code but NaN, scales 2^-17 .. 2^13)."""
    g = torch.Generator().manual_seed(3)
    d, rope = FORMATS["fp8_split"]
    nope = d - rope
    args, state, kwargs = make_case("fp8_split", 2, 2, 9, 20, "sliding", seed=4)
    ring = torch.randint(0, 256, state[0].shape, generator=g, dtype=torch.uint8)
    codes = (torch.arange(2 * 8 * nope) * 7 % 256).view(2, 8, nope).to(torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0
    ring[..., :nope] = codes
    ring[..., nope:nope + 2 * rope] = randn(g, 2, 8, rope).to(torch.bfloat16).view(torch.uint8)
    ring[..., nope + 2 * rope:nope + 2 * rope + 2] = torch.randint(110, 141, (2, 8, 2), generator=g, dtype=torch.uint8)
    ring[..., nope + 2 * rope + 2:] = 0
    assert len(torch.unique(codes)) == 254
    check_against_reference(args, [ring], kwargs)


def test_encode_is_bit_exact_on_ties_and_edges():
    """Storage encoding equals quant.encode_entries on round-half ties (e4m3 normal and subnormal,
    bf16), group amax / 448 just above / at a power of two, zeros, and half / bf16 inputs."""
    g = torch.Generator().manual_seed(1)
    e4m3 = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # all finite codes >= 0
    ties = (e4m3[:-1] + e4m3[1:]) / 2  # halfway between neighbours
    x = torch.zeros(6, 200)
    x[0, :126] = ties
    x[0, 126] = 448.0  # amax 448: scale exactly 1
    x[1, :126] = -ties * 2.0**-5
    x[1, 126] = 448.0 * 2.0**-5
    # group amax / 448 a few ulps above a power of two (2^-10 * (1 + 2^-23) among them): the UE8M0 scale is the
    # next power of two (quant.pow2_ceil), where exp2(ceil(log2(.))) would round down onto 2^-10 / 2^-20
    near = torch.tensor([448.0 * 2.0**-3, 448.0 * 2.0**-10, 448.0 * 2.0**-20, 448.0 * 2.0**-10]).view(torch.int32)
    x[2, [0, 64, 128, 192]] = (near + torch.tensor([1, 1, 2, 3], dtype=torch.int32)).view(torch.float32)
    x[3] = randn(g, 200) * 1e-7  # below the 1e-4 amax clamp: e4m3 subnormals
    x[4] = randn(g, 200) * torch.exp2(torch.randint(-30, 30, (200,), generator=g).float())
    tie = torch.arange(200, dtype=torch.int32) * 2**16 + 0x3F808000  # halfway between bf16 neighbours
    x[5] = (tie + torch.tensor([0, -1, 1, 0], dtype=torch.int32).repeat(50)).view(torch.float32)  # ties, and one ulp either side
    for fmt, rope in [("f32", 0), ("bf16", 0), ("fp8_split", 0), ("fp8_split", 8), ("fp8_split", 200)]:
        for t in (x, x.bfloat16(), x.clamp(-6e4, 6e4).half()):  # finite inputs
            ref, ours = encode_entries(t, fmt, rope), encode_kv(t, fmt, rope)
            assert ours.dtype == ref.dtype and torch.equal(ours.view(torch.uint8), ref.view(torch.uint8)), (fmt, rope)


def make_store(dense, page_entries=2, slots=3):
    """A tiered store (PagedEntries) holding the rows of `dense` [B, T, W]."""
    batch, capacity, width = dense.shape
    stats, device, host = TierStats(), TierAllocator("device", None), TierAllocator("host", None)
    pool = PagePool(slots, (page_entries, width), dense.dtype, device, stats)
    store = PagedEntries("test", batch, capacity, width, dense.dtype, page_entries, pool, host)
    store.write(0, dense)
    return store


@pytest.mark.parametrize("mode", ["csa", "hca"])
@pytest.mark.parametrize("fmt", ["f32", "fp8_split"])
def test_tiered_entries(fmt, mode):
    """Entries in a tiered store read exactly as the same entries in a dense tensor."""
    args, state, kwargs = make_case(fmt, 2, 4, 3, 14, mode, seed=7)
    dense = attention(*args, state=clone(state), **kwargs)
    ring = state[0].clone()
    tiered = check_against_reference(args, state, kwargs, ours_state=(ring, make_store(state[1])))
    assert torch.equal(tiered, dense)
    ref_ring = state[0].clone()
    ref_attention(*args, state=(ref_ring, make_store(state[1])), **kwargs)
    assert torch.equal(ring, ref_ring)


def test_launcher_is_registered():
    assert module.LAUNCHERS == {"attention": attention}
    assert LAUNCHERS["attention_rope"] is attention_rope


def bad(**changes):
    args, state, kwargs = make_case("fp8_split", 1, 2, 3, 4, "csa")
    q, kv, sinks, selected = args
    call = dict(q=q, kv=kv, sinks=sinks, selected=selected, state=state, **kwargs)
    call.update(changes)
    return call


@pytest.mark.parametrize("changes, message", [
    ({"kv_format": "fp8_block"}, "kv_format"),
    ({"kv_format": "f32"}, "state\\[0\\]"),  # fp8_split storage given as f32
    ({"window": 5}, "window - 1"),
    ({"q": torch.zeros(1, 2, 3, 70, dtype=torch.int32)}, "q: dtype"),
    ({"state": [torch.zeros(1, 80, 2, dtype=torch.uint8).transpose(1, 2)]}, "ring.*contiguous"),
    ({"kv": torch.zeros(1, 2, 69)}, "kv: expected"),
    ({"sinks": torch.zeros(4)}, "sinks"),
    ({"selected": torch.zeros(1, 3, 2, dtype=torch.long)}, "selected"),
    ({"selected": torch.zeros(1, 2, 2)}, "selected: dtype"),
    ({"selected": None, "rate": 0}, "rate"),
    ({"rope_dim": 71}, "rope_dim"),
    ({"pos0": -1}, "pos0"),
    ({"config": {"BLOCK_M": 16}}, "unknown keys"),
    ({"config": {"BLOCK_N": 8}}, "BLOCK_N"),
])
def test_rejects_unsupported_input(changes, message):
    with pytest.raises(ValueError, match=message):
        attention(**bad(**changes))


def test_rejects_a_bad_split_or_dot():
    args, state, kwargs = make_case("f32", 1, 1, 3, 3, "sliding")
    with pytest.raises(ValueError, match="SPLIT_KV"):
        attention(*args, state=state, **kwargs, config={"SPLIT_KV": -2})
    with pytest.raises(ValueError, match="DOT"):
        attention(*args, state=state, **kwargs, config={"DOT": "fp16"})


def test_rejects_entries_beyond_capacity():
    args, state, kwargs = make_case("f32", 1, 2, 3, 3 * CAPACITY + 1, "hca")
    with pytest.raises(ValueError, match="capacity"):
        attention(*args, state=state, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sliding", "csa", "hca"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_larger_shapes(fmt, mode):
    """More heads than one head block, prefill longer than the window, several key tiles."""
    args, state, kwargs = make_case(fmt, 2, 37, 16, 50, mode, seed=21, heads=19, capacity=40)
    check_against_reference(args, state, kwargs, config={"BLOCK_H": 16, "BLOCK_N": 16})
    args, state, kwargs = make_case(fmt, 1, 1, 33, 77, mode, seed=22, heads=5, capacity=40)
    check_against_reference(args, state, kwargs)

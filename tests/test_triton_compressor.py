"""The Triton compressor launcher (run in the Triton interpreter) against the runtime's torch kernel:
entries in every KV format, the mutated state (buffers, overlap, entries) across call boundaries,
tiered entry stores, and clear errors.

Entries are compared bit for bit where the format allows it; the pooled value is fp32 math in a
different summation order, so an element may land on the neighbouring code of a rounded format
(bf16, e4m3, e2m1) or an fp32 scale may differ in its last bit. Where the stored bytes differ, the
decoded values must agree within one code step of the format, and such rows must be rare."""

import itertools

import pytest
import torch
import triton
import triton.language as tl

from v4c.runtime.kernels.compressor import compress as reference
from v4c.runtime.quant import FP4_VALUES, decode_entries, encode_entries, entry_layout
from v4c.targets.triton.kernels import compressor
from v4c.targets.triton.kernels.compressor import _encode_blocks

FORMATS = ("f32", "bf16", "fp8_split", "fp8_block", "fp4_block")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "u8": torch.uint8}
TOL = 1e-5
g = torch.Generator().manual_seed(2)


def randn(*shape):
    return torch.randn(*shape, generator=g)


def make_inputs(b, s, d, rate, half, overlap):
    """kv, gate [B, S, C], ape [rate, C], norm weight [d], inv_freq [half]."""
    c = 2 * d if overlap else d
    return randn(b, s, c), randn(b, s, c) * 2, randn(rate, c), randn(d) + 1, torch.rand(half, generator=g)


def make_state(b, d, rate, half, overlap, fmt, capacity=12):
    c = 2 * d if overlap else d
    dtype, width = entry_layout(fmt, d, 2 * half)
    shapes = [(b, rate, c), (b, rate, c)] + ([(b, rate, d), (b, rate, d)] if overlap else [])
    return tuple(torch.zeros(sh) for sh in shapes) + (torch.zeros(b, capacity, width, dtype=DTYPES[dtype]),)


def clone(state):
    return tuple(t.clone() for t in state)


def step_tolerance(fmt, ref):
    """Largest difference one code step of `fmt` makes, per element of decoded entries [..., d]."""
    rowmax = ref.abs().amax(-1, keepdim=True)
    fp32 = TOL * rowmax
    if fmt == "f32":
        return fp32
    if fmt == "bf16":
        return 2.0**-8 * ref.abs() + fp32
    if fmt == "fp4_block":
        return 0.5 * ref.abs() + rowmax / 4  # e2m1: 4 -> 6 is the widest step; zero -> half a scale
    return 2.0**-3 * ref.abs() + rowmax * 2.0**-16 + fp32  # e4m3 (+ bf16 rope), subnormals step scale * 2^-9


def assert_entries_match(ours, ref, fmt, d, rope):
    """Bytes identical, or (rarely) decoded within one code step."""
    if fmt == "f32":
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, ref, rtol=TOL, atol=TOL * max(ref.abs().max().item(), 1e-30))
        return
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    dec_ours, dec_ref = decode_entries(ours, fmt, d, rope), decode_entries(ref, fmt, d, rope)
    assert ((dec_ours - dec_ref).abs() <= step_tolerance(fmt, dec_ref)).all()
    ours, ref = ours.view(torch.uint8), ref.view(torch.uint8)
    if fmt == "fp8_block":  # fp32 scales (amax / 448) follow the pooled amax to its last bit
        scales = [t[..., d:].contiguous().view(torch.float32) for t in (ours, ref)]
        torch.testing.assert_close(scales[0], scales[1], rtol=1e-6, atol=0)
        ours, ref = ours[..., :d], ref[..., :d]
    assert (ours != ref).float().mean() <= 0.02  # codes on the other side of a rounding boundary: rare


def assert_state_match(ours, ref, fmt, d, rope):
    """Buffers and overlap are exact copies (and one fp32 add); entries as assert_entries_match."""
    for a, b in zip(ours[:-1], ref[:-1]):
        assert torch.equal(a, b)
    assert_entries_match(ours[-1], ref[-1], fmt, d, rope)


def run_both(inputs, state, chunks, pos0=0, fmt="f32", overlap=False, rate=3, config=None, rope_scale=1.0):
    """Feed the tokens in `chunks` (sizes) from pos0 to both kernels, checking the state after every call."""
    kv, gate, ape, w, inv = inputs
    ours, ref = clone(state), clone(state)
    d = w.shape[0]
    pos = 0
    for size in chunks:
        args = (kv[:, pos:pos + size], gate[:, pos:pos + size], ape, w, inv)
        kw = dict(pos0=pos0 + pos, rate=rate, overlap=overlap, eps=1e-6, rope_scale=rope_scale, kv_format=fmt)
        reference(*args, state=ref, **kw)
        compressor.compress(*args, state=ours, config=config, **kw)
        assert_state_match(ours, ref, fmt, d, 2 * inv.shape[0])
        pos += size
    return ours, ref


# --- against the reference --------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("overlap", [False, True])
# nope 69 (odd, partial fp8 group) / 64 / 59 (odd; the last channel pair is p = 32, past a 32-pair tile)
@pytest.mark.parametrize("d,half", [(75, 3), (72, 4), (65, 3)])
def test_compress_matches_reference(fmt, overlap, d, half):
    b, rate = 2, 3
    inputs = make_inputs(b, 13, d, rate, half, overlap)
    ours, _ = run_both(inputs, make_state(b, d, rate, half, overlap, fmt), [5, 8], fmt=fmt, overlap=overlap,
                       rate=rate, rope_scale=0.9)
    assert ours[-1][:, 13 // rate:].float().abs().sum() == 0  # nothing written past the closed windows


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("rate,block_r", [(5, 2), (4, 1), (7, 4)])
def test_compress_in_chunks_of_window_positions(overlap, rate, block_r):
    """Windows longer than config block_r take several chunks in each softmax pass."""
    b, d, half = 2, 13, 2
    inputs = make_inputs(b, 3 * rate + 1, d, rate, half, overlap)
    run_both(inputs, make_state(b, d, rate, half, overlap, "f32"), [2, 3 * rate - 1], pos0=rate - 1, fmt="f32",
             overlap=overlap, rate=rate, config={"block_r": block_r, "num_warps": 2})


# --- call boundaries --------------------------------------------------------------------------
def split_call(inputs, state, sizes, total, start, **kw):
    """Feed `total` tokens in chunks cycling through `sizes`, the first at position `start`."""
    kv, gate, ape, w, inv = inputs
    pos = 0
    for size in itertools.cycle(sizes):
        if pos >= total:
            return state
        compressor.compress(kv[:, pos:pos + size], gate[:, pos:pos + size], ape, w, inv, state=state,
                            pos0=start + pos, eps=1e-6, **kw)
        pos += size


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("rate", [3, 4])
def test_compress_is_independent_of_call_boundaries(overlap, rate):
    b, s, d, half = 2, 17, 10, 2
    inputs = make_inputs(b, s, d, rate, half, overlap)
    kw = dict(rate=rate, overlap=overlap, kv_format="f32")
    # a first call of 5 tokens leaves pos0 = 5 > 0 (mid-window) for the rest, in one go or split
    head = split_call(inputs, make_state(b, d, rate, half, overlap, "f32"), [5], 5, 0, **kw)
    rest = tuple(t[:, 5:] for t in inputs[:2]) + inputs[2:]
    one = split_call(rest, clone(head), [s - 5], s - 5, 5, **kw)
    for sizes in ([1], [5, 1, 2, 7]):
        split = split_call(rest, clone(head), sizes, s - 5, 5, **kw)
        n = s // rate
        torch.testing.assert_close(split[-1][:, :n], one[-1][:, :n], rtol=TOL, atol=TOL)
        assert torch.equal(split[0][:, :s % rate], one[0][:, :s % rate])  # same buffered tail
        if overlap:
            assert torch.equal(split[2], one[2]) and torch.equal(split[3], one[3])
    # and the same as the reference fed in one call
    _, ref = run_both(inputs, make_state(b, d, rate, half, overlap, "f32"), [s], overlap=overlap, rate=rate)
    torch.testing.assert_close(one[-1], ref[-1], rtol=TOL, atol=TOL * ref[-1].abs().max().item())


@pytest.mark.parametrize("fmt", ["f32", "fp8_split"])
@pytest.mark.parametrize("overlap", [False, True])
def test_compress_token_by_token_matches_reference(fmt, overlap):
    b, rate, d, half = 1, 3, 70, 3
    inputs = make_inputs(b, 11, d, rate, half, overlap)
    run_both(inputs, make_state(b, d, rate, half, overlap, fmt), [1] * 7, pos0=4, fmt=fmt, overlap=overlap, rate=rate)


def test_a_call_that_closes_no_window_only_buffers():
    b, rate, d, half = 2, 5, 9, 2
    inputs = make_inputs(b, 3, d, rate, half, True)
    ours, _ = run_both(inputs, make_state(b, d, rate, half, True, "fp8_split"), [1, 2], pos0=6, fmt="fp8_split",
                       overlap=True, rate=rate)
    assert ours[-1].float().abs().sum() == 0 and ours[2].abs().sum() == 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("overlap", [False, True])
def test_a_decode_step_at_a_device_position_equals_the_host_positions(fmt, overlap):
    """pos0 as an int64 tensor, read by the kernels (a decode step replayed as a CUDA graph): token by token
    from position 1 over three windows, the state after every step is the int-position launcher's, bit for
    bit (which test_compress_token_by_token_matches_reference holds to the reference), but for the window
    buffers' stale rows. bf16 tokens, strided."""
    b, rate, d, half, n = 2, 3, 70, 3, 9
    kv, gate, ape, w, inv = make_inputs(b, n, d, rate, half, overlap)
    kv, gate = kv.bfloat16(), gate.transpose(0, 1).contiguous().transpose(0, 1)  # gate: a strided view
    host, dev = make_state(b, d, rate, half, overlap, fmt), make_state(b, d, rate, half, overlap, fmt)
    kw = dict(rate=rate, overlap=overlap, eps=1e-6, rope_scale=0.9, kv_format=fmt)
    for i in range(n):
        args = (kv[:, i:i + 1], gate[:, i:i + 1], ape, w, inv)
        compressor.compress(*args, state=host, pos0=1 + i, **kw)
        compressor.compress(*args, state=dev, pos0=torch.tensor([1 + i, 0]), **kw)
        held = (2 + i) % rate  # the buffers' rows past those of the open window are never read
        for name, a, c in zip(("buf_kv", "buf_gate"), host, dev):
            assert torch.equal(a[:, :held], c[:, :held]), f"step {i}: state {name}"
        for name, a, c in zip(("ovl_kv", "ovl_gate", "entries") if overlap else ("entries",), host[2:], dev[2:]):
            assert torch.equal(a, c), f"step {i}: state {name}"
    assert host[-1].view(torch.uint8)[:, (1 + n) // rate:].sum() == 0  # nothing written past the closed windows


@pytest.mark.parametrize("fmt", ["fp8_split", "fp4_block"])
def test_a_call_is_one_launch(fmt, monkeypatch):
    """Whatever the position and format, one kernel launch a call: the device position's buffer push and overlap
    carry, and the block formats' encoding, are in the compress kernel (they were three more launches)."""
    b, rate, d, half = 2, 3, 70, 3
    kv, gate, ape, w, inv = make_inputs(b, 4, d, rate, half, True)
    state = make_state(b, d, rate, half, True, fmt)
    launches = []
    for name in [n for n in dir(compressor) if n.endswith("_kernel")]:  # every kernel of the module, counted
        monkeypatch.setattr(compressor, name, type("Counted", (), {"__getitem__": lambda self, grid, real=getattr(
            compressor, name), name=name: (launches.append((name, grid)), real[grid])[1]})())
    kw = dict(rate=rate, overlap=True, eps=1e-6, kv_format=fmt)
    for i in range(3):  # positions 1, 2 (closes window 0), 3
        pos = torch.tensor([1 + i])
        compressor.compress(kv[:, i:i + 1], gate[:, i:i + 1], ape, w, inv, state=state, pos0=pos, **kw)
    assert launches == [("_compress_kernel", (1, b))] * 3
    compressor.compress(kv, gate, ape, w, inv, state=make_state(b, d, rate, half, True, fmt), pos0=0, **kw)
    assert launches[3:] == [("_compress_kernel", (1, b))]  # an int position: one launch for the closed window


def test_compress_without_norm_weight():
    b, rate, d, half = 2, 3, 9, 2
    kv, gate, ape, _, inv = make_inputs(b, 8, d, rate, half, False)
    ours, ref = make_state(b, d, rate, half, False, "f32"), make_state(b, d, rate, half, False, "f32")
    kw = dict(pos0=0, rate=rate, overlap=False, eps=1e-6)
    reference(kv, gate, ape, None, inv, state=ref, **kw)
    compressor.compress(kv, gate, ape, None, inv, state=ours, **kw)
    assert_state_match(ours, ref, "f32", d, 2 * half)


# --- entry stores -----------------------------------------------------------------------------
class Store:
    """A tiered entry store as far as the compressor sees one: write(start, rows)."""

    def __init__(self, dense):
        self.dense, self.writes = dense, []

    def write(self, start, rows):
        self.writes.append((start, rows.shape[1]))
        self.dense[:, start:start + rows.shape[1]] = rows


@pytest.mark.parametrize("fmt", ["bf16", "fp8_split", "fp4_block"])
def test_compress_writes_rows_to_a_store_object(fmt):
    b, rate, d, half = 2, 3, 12, 2
    inputs = make_inputs(b, 10, d, rate, half, True)
    dense = make_state(b, d, rate, half, True, fmt)
    ours = dense[:-1] + (Store(dense[-1].clone()),)
    ref = clone(dense)
    kv, gate, ape, w, inv = inputs
    for pos, size in ((0, 4), (4, 6)):
        args = (kv[:, pos:pos + size], gate[:, pos:pos + size], ape, w, inv)
        kw = dict(pos0=pos, rate=rate, overlap=True, eps=1e-6, kv_format=fmt)
        reference(*args, state=ref, **kw)
        compressor.compress(*args, state=ours, **kw)
    assert ours[-1].writes == [(0, 1), (1, 2)]
    assert_state_match(ours[:-1] + (ours[-1].dense,), ref, fmt, d, 2 * half)


def test_compress_into_strided_and_other_dtype_entries():
    """A strided entries view is written in place; f32 entries for bf16 rows are cast as in the reference."""
    b, rate, d, half = 2, 3, 8, 2
    inputs = make_inputs(b, 7, d, rate, half, False)
    wide = torch.zeros(b, 6, d + 5)
    state = make_state(b, d, rate, half, False, "f32")[:-1] + (wide[:, :, :d],)
    run_both(inputs, state, [7], fmt="f32", rate=rate)
    cast = make_state(b, d, rate, half, False, "f32")  # f32 storage, bf16 format
    ours, ref = run_both(inputs, cast, [4, 3], fmt="bf16", rate=rate)
    assert torch.equal(ours[-1], ref[-1].to(torch.bfloat16).float())


# --- codes on rounding boundaries ------------------------------------------------------------
def boundary_values(codes: torch.Tensor) -> torch.Tensor:
    """The representable values of a format, their midpoints (ties) and the fp32 neighbours of both, +-."""
    vals = codes.float()
    vals = vals[vals.isfinite()].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    both = torch.cat([vals, mids])
    near = torch.cat([both, both.nextafter(torch.tensor(float("inf"))), both.nextafter(torch.tensor(-float("inf")))])
    return torch.cat([near, -near])


@pytest.mark.parametrize("fmt,amax,codes", [
    ("fp8_block", 448.0, torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)),
    ("fp4_block", 6.0, FP4_VALUES),
])
def test_block_encodings_are_bit_exact_on_code_boundaries(fmt, amax, codes):
    """Rows whose scale is exactly 1 (amax 448 / 6, or 0 -> the 1e-4 floor), holding every code, tie and
    neighbour: the encode kernel's bytes equal encode_entries'."""
    d = 77
    vals = boundary_values(codes)
    vals = vals[vals.abs() <= amax]
    n_rows = -(-vals.shape[0] // (d - 1))
    rows = torch.zeros(n_rows * (d - 1))
    rows[:vals.shape[0]] = vals
    rows = torch.cat([torch.full((n_rows, 1), amax), rows.view(n_rows, d - 1)], dim=1)
    x = torch.cat([rows, torch.zeros(1, d)]).view(1, -1, d).contiguous()  # [1, n, d]
    ref = encode_entries(x, fmt, 0)
    ours = torch.empty_like(ref)
    fp4 = fmt == "fp4_block"
    block_g = triton.next_power_of_2(-(-d // (32 if fp4 else 128)))
    _encode_rows[(x.shape[1],)](x, ours, ours.stride(1), D=d, FP4=fp4, BLOCK_G=block_g)
    assert torch.equal(ours, ref)


@triton.jit
def _encode_rows(x_ptr, out_ptr, stride_ot, D: tl.constexpr, FP4: tl.constexpr, BLOCK_G: tl.constexpr):
    """The compress kernel's block encoding of f32 rows x [n, D] on its own: program i encodes row i."""
    i = tl.program_id(0)
    _encode_blocks(x_ptr + i * D, out_ptr + i * stride_ot, D, FP4, BLOCK_G)


def near_pow2_weight(d, qmax, group, nope):
    """A norm weight [d] whose groups of `group` nope channels have amax a few ulps above qmax * 2^e (e from
    -22 up), followed by values that quantize differently under 2^e and the exact UE8M0 scale 2^(e+1)."""
    w = torch.randn(d, generator=torch.Generator().manual_seed(9)) * 2.0**-40
    probes = torch.tensor([3.0, -5.0, 7.0]) * 2.0**-9 if qmax == 448 else torch.tensor([0.75, -2.5, 5.0])
    for k, col in enumerate(range(0, nope, group)):
        e = -22 + 5 * k
        w[col] = (torch.tensor(qmax * 2.0**e).view(torch.int32) + 1 + k % 3).view(torch.float32)
        w[col + 1:col + 4] = probes * 2.0**e
    return w


@pytest.mark.parametrize("fmt,d,half", [("fp8_split", 264, 4), ("fp4_block", 192, 1)])
def test_ue8m0_scales_just_above_a_power_of_two_are_exact(fmt, d, half):
    """UE8M0 group scales (fp8_split's per 64 nope channels, fp4_block's per 32) for amax / qmax just above a
    power of two: the exact next power of two, as quant.pow2_ceil, byte for byte. Rate 1, kv = +-1 and eps 0 make
    the pooled, normalized entry exactly the norm weight times +-1, and inv_freq 0 makes RoPE the identity."""
    b, s = 2, 3
    sign = torch.where(torch.rand(b, s, d, generator=torch.Generator().manual_seed(10)) < 0.5, -1.0, 1.0)
    nope, group, qmax = (d - 2 * half, 64, 448.0) if fmt == "fp8_split" else (d, 32, 6.0)
    inputs = (sign, torch.randn(b, s, d, generator=g), torch.randn(1, d, generator=g),
              near_pow2_weight(d, qmax, group, nope), torch.zeros(half))
    state = make_state(b, d, 1, half, False, fmt, capacity=s)
    kw = dict(pos0=0, rate=1, overlap=False, eps=0.0, kv_format=fmt)
    ours, ref = clone(state), clone(state)
    reference(*inputs, state=ref, **kw)
    compressor.compress(*inputs, state=ours, **kw)
    assert torch.equal(ours[-1], ref[-1])


# --- errors -----------------------------------------------------------------------------------
def bad_call(**changes):
    """A small valid compress call with `changes` applied (not yet run)."""
    b, rate, d, half = 1, 3, 8, 2
    kv, gate, ape, w, inv = make_inputs(b, 4, d, rate, half, False)
    args = dict(kv=kv, gate=gate, ape=ape, norm_weight=w, inv_freq=inv)  # positional, in order
    kw = dict(state=make_state(b, d, rate, half, False, "f32"), pos0=0, rate=rate, overlap=False, eps=1e-6,
              kv_format="f32")
    for name, value in changes.items():
        (args if name in args else kw)[name] = value
    return lambda: compressor.compress(*args.values(), **kw)


@pytest.mark.parametrize("call,match", [
    (bad_call(kv_format="fp8_e5m2"), "kv_format 'fp8_e5m2' is not supported"),
    (bad_call(kv=torch.ones(1, 4, 8, dtype=torch.int32)), "kv: dtype"),
    (bad_call(gate=torch.ones(1, 5, 8)), "gate: shape"),
    (bad_call(ape=torch.ones(4, 8)), "ape: expected shape"),
    (bad_call(norm_weight=torch.ones(7)), "norm_weight: expected shape"),
    (bad_call(inv_freq=torch.ones(5)), "inv_freq: 5 frequencies"),
    (bad_call(inv_freq=torch.ones(0)), "inv_freq: 0 frequencies"),
    (bad_call(overlap=True, norm_weight=torch.ones(4)), "state: expected 5 items"),
    (bad_call(kv=torch.ones(1, 4, 7), gate=torch.ones(1, 4, 7), ape=torch.ones(3, 7), overlap=True), "even channel"),
    (bad_call(state=(torch.zeros(1, 2, 8), torch.zeros(1, 3, 8), torch.zeros(1, 4, 8))), "state buf_kv"),
    (bad_call(state=(torch.zeros(1, 3, 8), torch.zeros(1, 3, 8), torch.zeros(1, 4, 9))), "entries: expected shape"),
    (bad_call(state=(torch.zeros(1, 3, 8), torch.zeros(1, 3, 8), torch.zeros(1, 1, 8)), pos0=3), "capacity 1"),
    (bad_call(state=(torch.zeros(1, 3, 8), torch.zeros(1, 3, 8), object())), "store with write"),
    (bad_call(rate=0), "rate: expected a positive int"),
    (bad_call(pos0=-1), "pos0: expected an int >= 0"),
    (bad_call(pos0=torch.tensor([0])), "one token a call"),
    (bad_call(pos0=torch.tensor([0], dtype=torch.int32)), "int64"),
    (bad_call(kv=torch.ones(1, 1, 8), gate=torch.ones(1, 1, 8), pos0=torch.tensor([0]),
              state=(torch.zeros(1, 3, 8), torch.zeros(1, 3, 8), Store(torch.zeros(1, 4, 8)))), "tiered store"),
    (bad_call(kv=torch.ones(1, 1, 8), gate=torch.ones(1, 1, 8), pos0=torch.tensor([0]),
              state=(torch.zeros(1, 3, 8).double(), torch.zeros(1, 3, 8), torch.zeros(1, 4, 8))), "state buf_kv"),
    (bad_call(config={"block_m": 4}), "config: unknown keys"),
])
def test_unsupported_inputs_raise_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_launcher_is_registered():
    assert compressor.LAUNCHERS == {"compress": compressor.compress}


# --- model-sized shapes -----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("fmt,overlap,rate,d,half", [
    ("fp8_split", True, 4, 512, 32),   # CSA entries
    ("fp8_split", False, 128, 512, 32),  # HCA entries
    ("fp8_block", True, 4, 128, 32),   # indexer keys
    ("fp4_block", True, 4, 128, 32),
    ("bf16", False, 128, 512, 32),
])
def test_compress_model_sized(fmt, overlap, rate, d, half):
    b, s = 1, 2 * rate + 3
    inputs = make_inputs(b, s, d, rate, half, overlap)
    state = make_state(b, d, rate, half, overlap, fmt, capacity=4)
    run_both(inputs, state, [rate + 1, s - rate - 1], fmt=fmt, overlap=overlap, rate=rate)

"""TVM CPU compressor and embedding kernels (targets/tvm/compress.py) against the runtime's torch reference
(runtime/kernels/compressor.py: compress; basic.embed; quantized.embed_fp8).

All kernels are built once, into one shared library, loaded with tvm_ffi and called with torch tensors.
Sizes are odd on purpose: d = 40 (rate 4, overlap: C = 80; fp8_split: one partial 64-group), d = 24 (rate 3,
no overlap), d = 136 (rate 4, overlap; rope 16: a full and a partial 64-group, two 128-groups of fp8_block),
each in every supported KV format (d = 136: not bf16). A session runs one state through: a prefill chunk
from pos0 = 0 ending mid-window, decode steps closing windows, a chunk of 37 tokens starting and ending
mid-window (at d = 136, B = 2 its windows go over the cores), a short chunk and a decode step; B = 1 and 2.

Tolerances, checked after every call: buffers and overlap state exact. f32 entries: rtol 1e-5, atol
1e-5 * max|ref| (fp32 summation order, exp / sin / cos polynomials); measured max |entry - ref| / max|ref|
<= 2.7e-7. Encoded entries are bit-identical to quant.encode_entries of the f32 kernel's rows
(test_encoding_exact; all-zero windows: to the reference's bytes), so against the reference they may differ
only where an fp32-order difference crosses a rounding boundary: checked, decoded within one code step and
under 1% of code bytes different; measured, bf16 / fp8_split / fp8_block codes all identical to the
reference's, fp8_block fp32 scales within 1e-6 (a last-bit difference of the amax; decoded <= 2.7e-7).
embed / embed_fp8 are bit-identical (checked).
"""

import pytest
import torch
import tvm  # noqa: F401  (apache-tvm: a test dependency; the compiler needs it, the runtime does not)
import tvm_ffi
from v4c.runtime.kernels.basic import embed
from v4c.runtime.kernels.compressor import compress
from v4c.runtime.kernels.quantized import embed_fp8
from v4c.runtime.quant import decode_entries, encode_entries, entry_layout, quant_fp8
from v4c.targets.tvm import build_library
from v4c.targets.tvm import compress as kernels

CONFIGS = {"ovl": (40, 4, 8, True), "plain": (24, 3, 8, False), "wide": (136, 4, 16, True)}  # d, rate, rope, overlap
FORMATS = ("f32", "bf16", "fp8_split", "fp8_block")
CASES = [(cfg, fmt) for cfg in CONFIGS for fmt in FORMATS if (cfg, fmt) != ("wide", "bf16")]  # (build time)
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "u8": torch.uint8}
EPS, ROPE_SCALE, CAPACITY = 1e-6, 0.8, 20
STEPS = [(0, 7), (7, 1), (8, 1), (9, 1), (10, 1), (11, 1), (12, 1), (13, 37), (50, 3), (53, 1)]  # (pos0, S)
V, DE, BLOCK = 50, 40, (16, 24)  # embedding table, fp8 block (partial blocks both ways)


def _kernels():
    ks = [kernels.compress(*CONFIGS[cfg][:3], overlap=CONFIGS[cfg][3], eps=EPS, rope_scale=ROPE_SCALE, kv_format=fmt,
                           name=f"{cfg}_{fmt}") for cfg, fmt in CASES]
    ks += [kernels.embed(DE, V, name="embed_f32"), kernels.embed(DE, V, weight_dtype="bfloat16", name="embed_bf16")]
    ks += [kernels.embed_fp8(DE, V, block=BLOCK, scale_format=f, name=f"embed_fp8_{f}") for f in ("fp32", "ue8m0")]
    return ks


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return tvm_ffi.load_module(build_library(_kernels(), str(tmp_path_factory.mktemp("tvm") / "compress.so")))


def _inputs(cfg, seed):
    """ape [rate, C], norm weight [d], inv_freq [rope/2] (large angles: positions up to 56 x 3)."""
    d, rate, rope, ovl = CONFIGS[cfg]
    g, c = torch.Generator().manual_seed(seed), (2 if ovl else 1) * d
    return torch.randn(rate, c, generator=g), torch.randn(d, generator=g) + 1, torch.rand(rope // 2, generator=g) * 3


def _state(cfg, fmt, batch):
    d, rate, rope, ovl = CONFIGS[cfg]
    dtype, width = entry_layout(fmt, d, rope)
    c = (2 if ovl else 1) * d
    bufs = [(batch, rate, c)] * 2 + [(batch, rate, d)] * 2 * ovl
    return [torch.full(s, float("nan")) for s in bufs] + [torch.zeros(batch, CAPACITY, width, dtype=DTYPES[dtype])]


def _session(lib, cfg, fmt, batch, seed=0):
    """Runs STEPS through the kernel and the reference, each on its own state; checks the state after every
    call (buffers exactly, entries as the module docstring says). -> (kernel state, reference state)."""
    d, rate, rope, ovl = CONFIGS[cfg]
    g, c = torch.Generator().manual_seed(seed + 1), (2 if ovl else 1) * d
    ape, nw, inv = _inputs(cfg, seed)
    ours, ref = _state(cfg, fmt, batch), _state(cfg, fmt, batch)
    worst = (0.0, 0.0)  # max |entry - ref| / max|ref| (decoded), share of stored bytes that differ
    for pos0, s in STEPS:
        kv, gate = torch.randn(batch, s, c, generator=g) * 2, torch.randn(batch, s, c, generator=g) * 3
        lib[f"{cfg}_{fmt}"](kv, gate, ape, nw, inv, *ours, pos0)
        compress(kv, gate, ape, nw, inv, state=ref, pos0=pos0, rate=rate, overlap=ovl, eps=EPS, rope_scale=ROPE_SCALE,
                 kv_format=fmt)
        where, n = f"{cfg} {fmt} B={batch} pos0={pos0} S={s}", (pos0 + s) // rate
        for a, b in zip(ours[:-1], ref[:-1]):  # buffers: the rows written so far (the rest stays NaN in both)
            assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), where
        worst = max(worst, _entries_close(ours[-1][:, :n], ref[-1][:, :n], fmt, d, rope, where))
        assert not ours[-1][:, n:].view(torch.uint8).any(), f"{where}: rows past the closed windows"
    print(f"{cfg} {fmt} B={batch}: max |entry - ref| / max|ref| = {worst[0]:.1e}, bytes differing {worst[1]:.2%}")
    return ours, ref


def _entries_close(ours, ref, fmt, d, rope, where):
    """-> (max |decoded - ref| / max|ref|, share of stored bytes (fp8_block: codes) that differ)."""
    a, b = decode_entries(ours, fmt, d, rope), decode_entries(ref, fmt, d, rope)
    err = ((a - b).abs().max() / b.abs().max()).item() if b.numel() else 0.0
    if fmt == "f32":
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(),
                                   msg=lambda m: f"{where}: {m}")
        return err, 0.0
    step = 2.0 ** -7 if fmt == "bf16" else 2.0 ** -3  # one code step, relative (+ e4m3 subnormals: scale * 2^-9)
    assert ((a - b).abs() <= step * b.abs() + 2.0 ** -16 * b.abs().amax(-1, keepdim=True) + 1e-30).all(), where
    ours, ref = ours.view(torch.uint8), ref.view(torch.uint8)
    if fmt == "fp8_block":  # fp32 scales amax / 448 follow the pooled amax to its last bits
        scales = [t[..., d:].contiguous().view(torch.float32) for t in (ours, ref)]
        torch.testing.assert_close(scales[0], scales[1], rtol=1e-6, atol=0, msg=lambda m: f"{where}: {m}")
        ours, ref = ours[..., :d], ref[..., :d]
    differ = (ours != ref).float().mean().item() if ours.numel() else 0.0
    assert differ < 0.01, where
    return err, differ


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("cfg, fmt", CASES)
def test_session(lib, cfg, fmt, batch):
    work = batch * 9 * 8 * CONFIGS[cfg][0]  # the 37-token chunk: 9 windows of 8 positions (overlap, rate 4)
    assert (work >= kernels.PAR_MIN_WORK) == (cfg == "wide" and batch == 2)  # the parallel path: covered once
    _session(lib, cfg, fmt, batch)


@pytest.mark.parametrize("cfg, fmt", [case for case in CASES if case[1] != "f32"])
def test_encoding_exact(lib, cfg, fmt):
    """The encoded rows are bit-identical to quant.encode_entries of the f32 kernel's rows (same pooling)."""
    _, rate, rope, _ = CONFIGS[cfg]
    n = sum(STEPS[-1]) // rate
    rows, _ = _session(lib, cfg, "f32", 2, seed=3)
    stored, _ = _session(lib, cfg, fmt, 2, seed=3)
    expected = encode_entries(rows[-1][:, :n], fmt, rope)
    assert torch.equal(stored[-1][:, :n].view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("fmt", [fmt for cfg, fmt in CASES if cfg == "wide"])
def test_zero_entries_exact(lib, fmt):
    """All-zero windows: zero entries, fp8 scales from the 1e-4 floor; bytes equal to the reference's."""
    d, rate, _, ovl = CONFIGS["wide"]
    ape, nw, inv = _inputs("wide", 0)
    kv, gate = torch.zeros(2, 3 * rate, 2 * d), torch.randn(2, 3 * rate, 2 * d)
    ours, ref = _state("wide", fmt, 2), _state("wide", fmt, 2)
    lib[f"wide_{fmt}"](kv, gate, ape, nw, inv, *ours, 0)
    compress(kv, gate, ape, nw, inv, state=ref, pos0=0, rate=rate, overlap=ovl, eps=EPS, rope_scale=ROPE_SCALE,
             kv_format=fmt)
    assert torch.equal(ours[-1].view(torch.uint8), ref[-1].view(torch.uint8))


def test_compress_bad_arguments_raise(lib):
    d, rate, rope, _ = CONFIGS["plain"]
    ape, nw, inv = _inputs("plain", 0)
    kv = torch.zeros(1, 7, d)
    state = _state("plain", "f32", 1)
    with pytest.raises(RuntimeError, match="pos0"):
        lib["plain_f32"](kv, kv, ape, nw, inv, *state, -1)
    with pytest.raises(RuntimeError, match="capacity"):  # (59 + 7) // 3 = 22 entries > 20
        lib["plain_f32"](kv, kv, ape, nw, inv, *state, 59)
    with pytest.raises(ValueError, match="shape"):
        lib["plain_f32"](kv, kv, ape, nw, inv, *state[:2], state[2][:, :, :-1], 0)
    with pytest.raises(ValueError, match="fp4_block"):
        kernels.compress(d, rate, rope, overlap=False, eps=EPS, kv_format="fp4_block", name="x")


@pytest.mark.parametrize("b, s", [(1, 1), (2, 7)])
def test_embed(lib, b, s):
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, V, (b, s), generator=g)
    tokens[0, 0] = V - 1
    weight = torch.randn(V, DE, generator=g)
    out = torch.empty(b, s, DE)
    for name, w in (("embed_f32", weight), ("embed_bf16", weight.bfloat16())):
        lib[name](tokens, w, out)
        assert torch.equal(out, embed(tokens, w)), name
    for fmt in ("fp32", "ue8m0"):
        q, scale = quant_fp8(weight * 50, BLOCK, fmt)
        lib[f"embed_fp8_{fmt}"](tokens, q.view(torch.uint8), scale if fmt == "fp32" else scale.view(torch.uint8), out)
        assert torch.equal(out, embed_fp8(tokens, q, scale, block=BLOCK)), fmt


@pytest.mark.parametrize("bad", [-1, V])
def test_embed_token_out_of_range_raises(lib, bad):
    tokens = torch.tensor([[1, bad, 2]])
    out = torch.empty(1, 3, DE)
    with pytest.raises(RuntimeError, match="token id"):
        lib["embed_f32"](tokens, torch.randn(V, DE), out)
    q, scale = quant_fp8(torch.randn(V, DE), BLOCK, "ue8m0")
    with pytest.raises(RuntimeError, match="token id"):
        lib["embed_fp8_ue8m0"](tokens, q.view(torch.uint8), scale.view(torch.uint8), out)

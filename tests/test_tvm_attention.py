"""TVM CPU attention kernel (targets/tvm/attention.py) against the runtime's torch reference
(runtime/kernels/attention.py: attention).

All kernels are built once, into one shared library, loaded with tvm_ffi and called with torch
tensors. Sizes are odd on purpose: H=3 heads (one partial head vector), D=40 with 8 RoPE channels
(fp8_split: one partial 64-group of 32 e4m3 channels), windows 6 / 7 (rings of 5 / 6 rows), HCA rate 4;
and H=17, D=136 (two head vectors; a full and a partial 64-group; a partial 16-lane vector). Sessions
run prefill chunks and decode steps through one state: chunks from pos0 = 0 and pos0 > 0, decode
steps that wrap the ring, a chunk longer than the ring, B = 1 and 2 (decode tokens split their keys
over parts, merged after: cores=4).

Tolerances: the new keys' storage rows and the ring are bit-identical to the reference's (checked
exactly); keys decode exactly; the only differences are fp32 summation order, the online softmax and
exp2's polynomial (relative error <= 1.1e-7): rtol 1e-5, atol 1e-5 * max|ref|. Measured on this machine
(AMD EPYC, znver4): max |out - ref| / max|ref| <= 1.5e-6 at H=3, D=40 and <= 3.5e-6 at H=17, D=136
(larger logits; against a float64 evaluation the kernel is within 1.5e-6 there, the reference 1.2e-6).
"""

import pytest
import torch
import tvm  # noqa: F401  (apache-tvm: a test dependency; the compiler needs it, the runtime does not)
import tvm_ffi
from v4c.runtime.kernels.attention import attention
from v4c.runtime.quant import encode_entries
from v4c.targets.tvm import build_library
from v4c.targets.tvm.attention import attention_kernel

H, D, ROPE, K, RATE, SCALE = 3, 40, 8, 5, 4, 0.3
WIDE = {"heads": 17, "dim": 136, "rope": 16}  # fp8_split only
WIDE_MODES = ("sliding", "csa")
WINDOWS = {"sliding": 7, "csa": 6, "hca": 7}
FORMATS = ("f32", "bf16", "fp8_split")
CAPACITY = 16  # entry rows
CORES = 4
# (pos0, S): a chunk inside the ring, decode steps that wrap it, a chunk longer than the ring (from
# pos0 > 0), decode, a short chunk
STEPS = [(0, 5), (5, 1), (6, 1), (7, 1), (8, 9), (17, 1), (18, 3)]


def _kernel(mode, fmt, heads=H, dim=D, rope=ROPE):
    return attention_kernel(heads, dim, WINDOWS[mode], kv_format=fmt, rope_dim=rope, mode=mode, topk=K, rate=RATE,
                            scale=SCALE, cores=CORES)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    funcs = {f"{mode}_{fmt}": _kernel(mode, fmt) for mode in WINDOWS for fmt in FORMATS}
    funcs.update({f"{mode}_wide": _kernel(mode, "fp8_split", **WIDE) for mode in WIDE_MODES})
    return tvm_ffi.load_module(build_library(funcs, str(tmp_path_factory.mktemp("tvm") / "attention.so")))


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _call(f, mode, q, kv, sinks, selected, ring, entries, pos0):
    out = torch.empty(q.shape)
    args = [q, kv, sinks] + ([selected] if mode == "csa" else []) + [ring] + ([entries] if mode != "sliding" else [])
    f(*args, out, pos0)
    return out


def _session(lib, name, mode, fmt, batch, heads=H, dim=D, rope=ROPE, seed=0):
    """Runs STEPS through the kernel and the reference, each on its own copy of the state; -> the worst
    relative error. Outputs are compared after every call, rings bytewise."""
    gen = torch.Generator().manual_seed(seed)
    window = WINDOWS[mode]
    ring = encode_entries(_randn(gen, batch, window - 1, dim), fmt, rope)  # rows never written must never be read
    entries = encode_entries(_randn(gen, batch, CAPACITY, dim) * 2, fmt, rope)
    ref_ring = ring.clone()
    sinks = _randn(gen, heads)
    worst = 0.0
    for pos0, s in STEPS:
        q, kv = _randn(gen, batch, s, heads, dim), _randn(gen, batch, s, dim) * 2
        selected = torch.randint(-1, CAPACITY, (batch, s, K), generator=gen)
        selected[..., 1] = selected[..., 0]  # duplicates count twice
        selected[0, -1, :2] = -1
        out = _call(lib[name], mode, q, kv, sinks, selected, ring, entries, pos0)
        state = (ref_ring,) if mode == "sliding" else (ref_ring, entries)
        ref = attention(q, kv, sinks, selected if mode == "csa" else None, state=state, pos0=pos0, window=window,
                        rate=RATE if mode == "hca" else 0, scale=SCALE, kv_format=fmt, rope_dim=rope)
        where = f"pos0={pos0} S={s}"
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(),
                                   msg=lambda m, where=where: f"{where}: {m}")
        assert torch.equal(ring.view(torch.uint8), ref_ring.view(torch.uint8)), f"ring after {where}"
        worst = max(worst, ((out - ref).abs().max() / ref.abs().max()).item())
    print(f"{name} B={batch}: max |out - ref| / max|ref| = {worst:.1e}")
    return worst


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", list(WINDOWS))
def test_session(lib, mode, fmt, batch):
    _session(lib, f"{mode}_{fmt}", mode, fmt, batch)


@pytest.mark.parametrize("mode", WIDE_MODES)
def test_session_wide(lib, mode):
    _session(lib, f"{mode}_wide", mode, "fp8_split", 2, **WIDE)


def _edge_keys(dim, rope):
    """Keys exercising the storage rounding: e4m3 ties at several exponents (to even) in a group whose
    scale is 1 (amax 448), ties in the e4m3 subnormal range, zeros and negative zeros, an all-zero group
    (scale from the 1e-4 floor), tiny and huge groups; bf16 ties in the RoPE channels."""
    nope = dim - rope
    x = torch.randn(6, dim, generator=torch.Generator().manual_seed(5))
    ties = 1 + (torch.arange(8) * 2 + 1).float() / 16  # halfway between e4m3 neighbours in [1, 2)
    x[0, :8], x[0, 8:16], x[0, 16] = ties, -ties * 4, 448.0
    x[1, :8], x[1, 8] = (torch.arange(8) * 2 + 1).float() * 2.0 ** -10, 448.0  # subnormal ties
    x[2, :4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])
    x[3, :nope] = 0.0
    x[4, :nope] *= 1e-6
    x[5, :nope] *= 3e4
    x[:, nope:nope + 4] = torch.tensor([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, -(1 + 2.0 ** -8), 2.0 ** -130])
    return x


@pytest.mark.parametrize("name, heads, dim, rope, fmt", [("sliding_fp8_split", H, D, ROPE, "fp8_split"),
                                                          ("sliding_wide", 17, 136, 16, "fp8_split"),
                                                          ("sliding_bf16", H, D, ROPE, "bf16")])
def test_ring_rows_exact(lib, name, heads, dim, rope, fmt):
    """A chunk of W-1 tokens from pos0 = 0 fills the ring with exactly quant.encode_entries of its keys."""
    kv = _edge_keys(dim, rope).unsqueeze(0)  # [1, 6 = W-1, D]
    ring = torch.zeros_like(encode_entries(kv, fmt, rope))
    q = torch.randn(1, 6, heads, dim, generator=torch.Generator().manual_seed(6))
    _call(lib[name], "sliding", q, kv, torch.zeros(heads), None, ring, None, 0)
    assert torch.equal(ring.view(torch.uint8), encode_entries(kv, fmt, rope).view(torch.uint8))


def test_bad_arguments_raise(lib):
    """Wrong shapes or dtypes raise, never crash."""
    f = lib["csa_fp8_split"]
    ring = torch.zeros(2, WINDOWS["csa"] - 1, encode_entries(torch.zeros(1, D), "fp8_split", ROPE).shape[-1],
                       dtype=torch.uint8)
    entries = torch.zeros(2, CAPACITY, ring.shape[-1], dtype=torch.uint8)
    q, kv, sinks = torch.zeros(2, 1, H, D), torch.zeros(2, 1, D), torch.zeros(H)
    sel = torch.zeros(2, 1, K, dtype=torch.long)
    out = torch.empty(2, 1, H, D)
    f(q, kv, sinks, sel, ring, entries, out, 0)
    with pytest.raises(ValueError, match="kv"):
        f(q, torch.zeros(2, 1, D + 1), sinks, sel, ring, entries, out, 0)
    with pytest.raises(ValueError, match="ring"):  # W-2 rows
        f(q, kv, sinks, sel, ring[:, :-1].contiguous(), entries, out, 0)
    with pytest.raises(ValueError, match="shape"):  # batch 1 against 2
        f(q, kv, sinks, sel, ring, entries[:1], out, 0)
    with pytest.raises(TypeError, match="dtype"):
        f(q, kv, sinks, sel.int(), ring, entries, out, 0)

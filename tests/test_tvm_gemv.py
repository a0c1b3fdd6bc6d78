"""TVM CPU GEMV kernels (targets/tvm/gemv.py) against the runtime's torch reference kernels.

All kernels are built once, into one shared library (build_library), loaded with tvm_ffi and called
with torch tensors. Shapes are odd on purpose (N=200, K=300: partial 128-blocks, K not a multiple
of the 16-lane vectors, partial activation groups).

Tolerances: every kernel decodes its weights exactly (fp32, bf16, e4m3, e2m1 and block scales are
exact in fp32) and quantizes activations bit-identically to quant.fake_quant_act (checked exactly
through an identity weight), so the only difference from the reference is fp32 summation order:
rtol 1e-5, atol 1e-5 * max|ref| for every kernel. Measured on this machine (AMD EPYC, znver4): max
|y - ref| / max|ref| <= 5e-7 for fp32 / bf16 / FP8 (all block / scale / act variants) / FP4.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import tvm  # noqa: F401  (apache-tvm: a test dependency; the compiler needs it, the runtime does not)
import tvm_ffi

from v4c.runtime.kernels.basic import grouped_linear, linear
from v4c.runtime.kernels.quantized import grouped_linear_fp8, linear_fp8
from v4c.runtime.quant import dequant_fp4, fake_quant_act, quant_fp4, quant_fp8
from v4c.targets.tvm import gemv

N, K, G = 200, 300, 4
MS = (1, 3)
ACTS = {
    "none": {"mode": "none"},
    "dyn128": {"mode": "dynamic", "group": 128, "scale_format": "fp32"},
    "dyn128_ue8m0": {"mode": "dynamic", "group": 128, "scale_format": "ue8m0"},
    "dyn32": {"mode": "dynamic", "group": 32, "scale_format": "fp32"},
    "static": {"mode": "static", "scale": 0.0123},
}
BLOCKS = {"128x128": (128, 128), "1x32": (1, 32), "channel": (1, K)}
FP8_CASES = [(m, b, sf, a) for m in MS for b in BLOCKS for sf in ("fp32", "ue8m0") for a in ACTS
             if m == 3 or a in ("none", "dyn128_ue8m0")]


def _kernels():
    ks = {}
    for m in MS:
        for wd in ("float32", "bfloat16"):
            ks[f"dense_{wd}_m{m}"] = gemv.dense_gemv(N, K, m, weight_dtype=wd)
            ks[f"dense_{wd}_g_m{m}"] = gemv.dense_gemv(N, K, m, weight_dtype=wd, groups=G)
        for a in ("none", "dyn128"):
            ks[f"fp8_g_{a}_m{m}"] = gemv.fp8_gemv(N, K, m, block=(128, 128), act=ACTS[a], groups=G)
            ks[f"fp4_{a}_m{m}"] = gemv.fp4_gemv(N, K, m, act=ACTS[a])
    for m, b, sf, a in FP8_CASES:
        ks[f"fp8_{b}_{sf}_{a}_m{m}"] = gemv.fp8_gemv(N, K, m, block=BLOCKS[b], scale_format=sf, act=ACTS[a])
    for a in ("dyn128", "dyn128_ue8m0", "dyn32", "static"):  # identity weight: y = fake_quant_act(x) exactly
        ks[f"ident_{a}"] = gemv.fp8_gemv(K, K, 3, block=(128, 128), act=ACTS[a])
    ks["fp8_m16"] = gemv.fp8_gemv(N, K, 16, block=(128, 128), scale_format="ue8m0", act=ACTS["dyn128"])
    ks["fp8_odd"] = gemv.fp8_gemv(N + 1, K, 7, block=(128, 128), act=ACTS["dyn32"])  # a lone row; 4 + 3 tokens
    ks["fp4_m16"] = gemv.fp4_gemv(N, K, 16, act=ACTS["dyn128"])
    ks["fp4_k34"] = gemv.fp4_gemv(51, 34, 3, act=ACTS["dyn128"])
    return ks


@pytest.fixture(scope="module")
def lib_path(tmp_path_factory):
    return gemv.build_library(_kernels(), str(tmp_path_factory.mktemp("tvm") / "gemv.so"))


@pytest.fixture(scope="module")
def lib(lib_path):
    return tvm_ffi.load_module(lib_path)


def _close(y, ref):
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def _fp8_weight(n, k, block, scale_format, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, s = quant_fp8(torch.randn(n, k, generator=g), block, scale_format)
    s_arg = s.view(torch.uint8) if scale_format == "ue8m0" else s
    return q, s, s_arg


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("wd", ["float32", "bfloat16"])
def test_dense(lib, m, wd):
    w = _x(N, K, seed=2).to(getattr(torch, wd))
    x = _x(m, K)
    y = torch.empty(m, N)
    lib[f"dense_{wd}_m{m}"](x, w, y)
    _close(y, linear(x, w))
    xg, yg = _x(m, G, K), torch.empty(m, G, N // G)
    lib[f"dense_{wd}_g_m{m}"](xg, w, yg)
    _close(yg, grouped_linear(xg, w, groups=G))


@pytest.mark.parametrize("m, b, sf, a", FP8_CASES)
def test_fp8(lib, m, b, sf, a):
    q, s, s_arg = _fp8_weight(N, K, BLOCKS[b], sf)
    x = _x(m, K) * 3
    y = torch.empty(m, N)
    lib[f"fp8_{b}_{sf}_{a}_m{m}"](x, q.view(torch.uint8), s_arg, y)
    _close(y, linear_fp8(x, q, s, block=BLOCKS[b], act=ACTS[a]))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("a", ["none", "dyn128"])
def test_fp8_grouped(lib, m, a):
    q, s, _ = _fp8_weight(N, K, (128, 128), "fp32")
    x, y = _x(m, G, K), torch.empty(m, G, N // G)
    lib[f"fp8_g_{a}_m{m}"](x, q.view(torch.uint8), s, y)
    _close(y, grouped_linear_fp8(x, q, s, groups=G, block=(128, 128), act=ACTS[a]))


@pytest.mark.parametrize("name, n, m", [("fp8_m16", N, 16), ("fp8_odd", N + 1, 7)])
def test_fp8_token_blocks_and_odd_rows(lib, name, n, m):
    """16 tokens (4 blocks of 4), 7 tokens (4 + 3) with an odd N (the row pairs leave one row)."""
    sf = "ue8m0" if name == "fp8_m16" else "fp32"
    act = ACTS["dyn128"] if name == "fp8_m16" else ACTS["dyn32"]
    q, s, s_arg = _fp8_weight(n, K, (128, 128), sf)
    x, y = _x(m, K), torch.empty(m, n)
    lib[name](x, q.view(torch.uint8), s_arg, y)
    _close(y, linear_fp8(x, q, s, block=(128, 128), act=act))


def _edge_activations():
    """Rows of x exercising e4m3 rounding: ties at several exponents (to even), values near 2^-6 and
    in the subnormal range, saturation past 448 * scale, zeros and negative zeros."""
    x = _x(3, K) * torch.logspace(-4, 3, K)
    ties = (torch.arange(1, 9) * 2 + 1).float() / 16  # (2j + 1) / 16: halfway between e4m3 neighbours
    x[0, :8], x[0, 8:16] = ties, -ties * 2.0 ** -7
    x[1, 128:136] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3e4, -3e4, 2.0 ** -6, 2.0 ** -10])
    x[2, 256:] = 0.0
    return x


@pytest.mark.parametrize("a", ["dyn128", "dyn128_ue8m0", "dyn32", "static"])
def test_activation_quant_exact(lib, a):
    eye = torch.eye(K).to(torch.float8_e4m3fn)
    s = torch.ones(gemv.cdiv(K, 128), gemv.cdiv(K, 128))
    x, y = _edge_activations(), torch.empty(3, K)
    lib[f"ident_{a}"](x, eye.view(torch.uint8), s, y)
    assert torch.equal(y, fake_quant_act(x, ACTS[a]))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("a", ["none", "dyn128"])
def test_fp4(lib, m, a):
    packed, s = quant_fp4(_x(N, K, seed=3))
    x, y = _x(m, K), torch.empty(m, N)
    lib[f"fp4_{a}_m{m}"](x, packed.view(torch.uint8), s.view(torch.uint8), y)
    _close(y, F.linear(fake_quant_act(x, ACTS[a]), dequant_fp4(packed, s)))


@pytest.mark.parametrize("name, n, k, m", [("fp4_k34", 51, 34, 3), ("fp4_m16", N, K, 16)])
def test_fp4_partial_block_and_token_blocks(lib, name, n, k, m):
    packed, s = quant_fp4(_x(n, k, seed=4))
    x, y = _x(m, k), torch.empty(m, n)
    lib[name](x, packed.view(torch.uint8), s.view(torch.uint8), y)
    _close(y, F.linear(fake_quant_act(x, ACTS["dyn128"]), dequant_fp4(packed, s)))


def test_unaligned_views_and_bad_shapes(lib):
    """Expert slices of a stacked weight are unaligned views: fine. A wrong shape, dtype or a
    non-contiguous tensor raises, never crashes."""
    q, s, _ = _fp8_weight(3 * N + 1, K, (1, 32), "fp32")
    x, y = _x(1, K), torch.empty(1, N)
    w, sw = q[1:N + 1], s[1:N + 1]
    lib["fp8_1x32_fp32_none_m1"](x, w.view(torch.uint8), sw, y)
    _close(y, linear_fp8(x, w, sw, block=(1, 32), act=ACTS["none"]))
    f = lib["fp8_1x32_fp32_none_m1"]
    with pytest.raises(ValueError, match="shape"):
        f(x, q.view(torch.uint8), s, y)
    with pytest.raises(TypeError, match="dtype"):
        f(x, w.view(torch.uint8), sw.double(), y)
    with pytest.raises(ValueError, match="compact"):
        f(_x(1, 2 * K)[:, ::2], w.view(torch.uint8), sw, y)


def test_loads_without_tvm(lib_path):
    """The exported library runs in a process where `import tvm` fails: tvm_ffi (and torch) only."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["tvm"] = None  # any import of tvm now raises
        import torch, tvm_ffi
        from v4c.runtime.kernels.quantized import linear_fp8
        from v4c.runtime.quant import quant_fp8
        lib = tvm_ffi.load_module({lib_path!r})
        q, s = quant_fp8(torch.randn({N}, {K}), (128, 128), "ue8m0")
        act = {{"mode": "dynamic", "group": 128, "scale_format": "ue8m0"}}
        x, y = torch.randn(3, {K}), torch.empty(3, {N})
        lib["fp8_128x128_ue8m0_dyn128_ue8m0_m3"](x, q.view(torch.uint8), s.view(torch.uint8), y)
        ref = linear_fp8(x, q, s, block=(128, 128), act=act)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        assert not any(name == "tvm" or name.startswith("tvm.") for name, mod in sys.modules.items() if mod)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr

"""TVM CPU row-wise kernels (targets/tvm/rowwise.py) against the runtime's torch reference kernels.

All kernels are built once, into one shared library, loaded with tvm_ffi and called with torch
tensors. Sizes are odd on purpose: d = 200 / 100 (a partial 16-lane vector), rope_dim 20 / 36 (two
trailing pairs), hc = 3 (an odd number of mixes), token counts 1, 3 and 37 (token blocks of 4, 2 and 1;
three hc chunks of 16, in parallel), and larger calls that take the parallel path of the other kernels.

Tolerances: the kernels differ from the reference by fp32 summation order, FMA contraction and the
inline exp / sin / cos polynomials (<= 2 ulp) only: rtol 1e-5, atol 1e-5 * max|ref| for every kernel,
Sinkhorn's 20 iterations included. Measured on this machine (AMD EPYC, znver4): max |y - ref| / max|ref|
<= 2e-7 for rms_norm / rope / hc_post / hc_head, <= 4e-8 for swiglu, <= 4e-7 for hc_pre here (7e-7 seen
with other inputs; comb after 20 Sinkhorn iterations); add and hc_expand are exact.
"""

import pytest
import torch
import tvm  # noqa: F401  (apache-tvm: a test dependency; the compiler needs it, the runtime does not)
import tvm_ffi

from v4c.runtime.kernels import basic, hyper
from v4c.targets.tvm import build_library, rowwise

D, HD = 200, 100  # model dim of the norms, head / stream dim
MS = (1, 3, 37)
EPS, NORM_EPS = 1e-6, 1e-5
ROPES = {  # name: heads, rope_dim, inverse, scale
    "rope": (3, 20, False, 1.0),  # a full vector and two trailing pairs
    "rope_inv": (3, 36, True, 0.7),
    "rope_3d": (1, HD, False, 1.0),  # a [b, s, d] tensor, passed as [b, s, 1, d]
}
HCS = {"hc4": (4, 20), "hc3": (3, 3)}  # name: hc, Sinkhorn iterations


def _kernels():
    ks = [rowwise.rms_norm(D, eps=EPS, name="rms"), rowwise.rms_norm(D, eps=EPS, weight=False, name="rms_nw"),
          rowwise.add(name="add"), rowwise.swiglu(name="swiglu"), rowwise.swiglu(limit=10.0, name="swiglu10")]
    ks += [rowwise.rope(heads, HD, r, inverse=inv, scale=sc, name=n) for n, (heads, r, inv, sc) in ROPES.items()]
    for n, (hc, iters) in HCS.items():
        ks.append(rowwise.hc_pre(hc, HD, iters=iters, eps=EPS, norm_eps=NORM_EPS, name=f"{n}_pre"))
        ks.append(rowwise.hc_head(hc, HD, eps=EPS, norm_eps=NORM_EPS, name=f"{n}_head"))
        ks.append(rowwise.hc_post(hc, HD, name=f"{n}_post"))
        ks.append(rowwise.hc_expand(hc, HD, name=f"{n}_expand"))
    return ks


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return tvm_ffi.load_module(build_library(_kernels(), str(tmp_path_factory.mktemp("tvm") / "rowwise.so")))


def _close(y, ref):
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("m", MS + (1400,))  # 1400 x 200: the parallel path
def test_rms_norm(lib, m):
    assert (m * D >= rowwise.PAR_MIN_ELEMS) == (m == 1400)
    x, w, y = _x(m, D) * 3, _x(D, seed=2), torch.empty(m, D)
    lib["rms"](x, w, y)
    _close(y, basic.rms_norm(x, w, eps=EPS))
    lib["rms_nw"](x, y)
    _close(y, basic.rms_norm(x, eps=EPS))


def test_rms_norm_unaligned_views_and_bad_shapes(lib):
    x, w = _x(3 * D + 1)[1:].view(3, D), _x(D + 1, seed=2)[1:]  # 4-byte aligned only
    y = torch.empty(3 * D + 1)[1:].view(3, D)
    lib["rms"](x, w, y)
    _close(y, basic.rms_norm(x, w, eps=EPS))
    with pytest.raises(ValueError, match="shape"):
        lib["rms"](x, _x(D + 1), y)
    with pytest.raises(ValueError, match="compact"):
        lib["rms"](_x(3, 2 * D)[:, ::2], w, y)


@pytest.mark.parametrize("n", [5, 3 * D + 7, 270_007])  # 270007: parallel chunks, the last one partial
def test_add_and_swiglu(lib, n):
    gate, up, y = _x(n) * 8, _x(n, seed=2) * 8, torch.empty(n)
    gate[:4] = torch.tensor([-100.0, 100.0, -88.0, 0.0])  # exp's clamp range, both ends
    lib["add"](gate, up, y)
    assert torch.equal(y, basic.add(gate, up))
    lib["swiglu"](gate, up, y)
    _close(y, basic.swiglu(gate, up))
    lib["swiglu10"](gate, up, y)
    _close(y, basic.swiglu(gate, up, limit=10.0))


@pytest.mark.parametrize("name", ROPES)
@pytest.mark.parametrize("b, s", [(1, 1), (2, 3), (1, 37), (2, 440)])  # 2 x 440 x 3 heads: the parallel path
def test_rope(lib, name, b, s):
    heads, rope_dim, inverse, scale = ROPES[name]
    x = _x(b, s, heads, HD)
    positions = torch.randint(0, 100_000, (s,), generator=torch.Generator().manual_seed(3))  # large angles
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rope_dim, 2).float() / rope_dim)
    y = torch.empty_like(x)
    lib[name](x, positions, inv_freq, y)
    _close(y, basic.rope(x, positions, inv_freq, inverse=inverse, scale=scale))
    if heads == 1:  # the program's 3-d tensors [b, s, d]
        _close(y.view(b, s, HD), basic.rope(x.view(b, s, HD), positions, inv_freq))


def _hc_inputs(hc, m, nmix):
    streams = _x(1, m, hc, HD) * 2
    fn, base, scale = _x(nmix, hc * HD, seed=2) * 0.05, _x(nmix, seed=3) * 0.5, torch.tensor([0.9, 1.3, 2.0])
    return streams, fn, base, scale


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("cfg", HCS)
def test_hc_pre(lib, cfg, m):
    hc, iters = HCS[cfg]
    streams, fn, base, scale = _hc_inputs(hc, m, (2 + hc) * hc)
    collapsed, post, comb = torch.empty(m, HD), torch.empty(m, hc), torch.empty(m, hc, hc)
    lib[f"{cfg}_pre"](streams[0], fn, base, scale, collapsed, post, comb)
    ref = hyper.hc_pre(streams, fn, base, scale, iters=iters, eps=EPS, norm_eps=NORM_EPS)
    for y, r in zip((collapsed, post, comb), ref):
        _close(y, r[0])


@pytest.mark.parametrize("m", MS + (900,))  # 900 x hc x 100: the parallel path
@pytest.mark.parametrize("cfg", HCS)
def test_hc_post_head_expand(lib, cfg, m):
    hc = HCS[cfg][0]
    streams, fn, base, scale = _hc_inputs(hc, m, hc)
    out, post, comb = _x(m, HD, seed=4), torch.rand(m, hc) * 2, torch.rand(m, hc, hc)
    new = torch.empty(m, hc, HD)
    lib[f"{cfg}_post"](out, streams[0], post, comb, new)
    _close(new, hyper.hc_post(out, streams[0], post, comb))
    y = torch.empty(m, HD)
    lib[f"{cfg}_head"](streams[0], fn, base, scale[:1], y)
    _close(y, hyper.hc_head(streams, fn, base, scale[:1], eps=EPS, norm_eps=NORM_EPS)[0])
    lib[f"{cfg}_expand"](out, new)
    assert torch.equal(new, hyper.hc_expand(out[None], hc=hc)[0])

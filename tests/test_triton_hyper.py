"""The Triton mHC kernels (targets/triton/kernels/hyper.py) against the runtime's torch kernels,
under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py), on odd shapes and hc 1..4."""

import inspect
import re

import pytest
import torch

from v4c.runtime.kernels import hyper as ref
from v4c.runtime.kernels import quantized as ref_quantized
from v4c.targets.triton.kernels import hyper as tri
from v4c.targets.triton.kernels import hyper_quant, norm

HCS = (1, 2, 3, 4)
SHAPES = ((1, 1, 17), (2, 3, 33), (1, 5, 48), (2, 2, 100))  # (B, S, D)
EPS, NORM_EPS = 1e-6, 1e-6


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def assert_close(ours, expected, rtol=1e-5, atol=1e-5):
    """fp32 parity: |ours - expected| <= atol * max|expected| + rtol * |expected|."""
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    scale = max(float(expected.abs().max()), 1e-30) if expected.numel() else 1.0
    torch.testing.assert_close(ours, expected, rtol=rtol, atol=atol * scale)


def pre_params(hc, d, seed=1, comb_scale=1.0):
    """fn [(2+hc)*hc, hc*D], base [(2+hc)*hc], scale [3], sized like a trained layer's."""
    n = (2 + hc) * hc
    scale = torch.tensor([0.7, -1.3, comb_scale])
    return randn(n, hc * d, seed=seed, scale=(hc * d) ** -0.5), randn(n, seed=seed + 1), scale


def head_params(hc, d, seed=2):
    return randn(hc, hc * d, seed=seed, scale=(hc * d) ** -0.5), randn(hc, seed=seed + 1), torch.tensor([0.9])


def test_launchers_match_the_reference_signatures():
    assert set(tri.LAUNCHERS) == {"hc_expand", "hc_pre", "hc_post", "hc_post_pre", "hc_head"}
    assert set(hyper_quant.LAUNCHERS) == {"hc_post_pre_quant"}
    for name, launcher in {**tri.LAUNCHERS, **hyper_quant.LAUNCHERS}.items():
        params = dict(inspect.signature(launcher).parameters)
        for extra in ("config", "into"):  # launch parameters, and the runtime's buffer to write (common.result)
            param = params.pop(extra)
            assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is None
        reference = getattr(ref, name, None) or getattr(ref_quantized, name)
        assert list(params.values()) == list(inspect.signature(reference).parameters.values())


# --- parity --------------------------------------------------------------------------------------
@pytest.mark.parametrize("hc", HCS)
@pytest.mark.parametrize("b,s,d", SHAPES)
def test_hc_expand(hc, b, s, d):
    x = randn(b, s, d)
    out = tri.hc_expand(x, hc=hc)
    assert torch.equal(out, ref.hc_expand(x, hc=hc))


@pytest.mark.parametrize("hc", HCS)
@pytest.mark.parametrize("b,s,d", SHAPES)
def test_hc_pre(hc, b, s, d):
    streams = randn(b, s, hc, d, seed=hc + d)
    args = (streams, *pre_params(hc, d))
    kw = dict(iters=20, eps=EPS, norm_eps=NORM_EPS)
    for ours, expected in zip(tri.hc_pre(*args, **kw), ref.hc_pre(*args, **kw), strict=True):
        assert_close(ours, expected)


@pytest.mark.parametrize("hc", HCS)
@pytest.mark.parametrize("b,s,d", SHAPES)
def test_hc_post(hc, b, s, d):
    out, streams = randn(b, s, d, seed=3), randn(b, s, hc, d, seed=4)
    post, comb = 2 * torch.rand(b, s, hc), torch.rand(b, s, hc, hc)
    assert_close(tri.hc_post(out, streams, post, comb), ref.hc_post(out, streams, post, comb))
    # the fuse pass's add_post: the block output out + addend, as the add kernel adds them (the same bits)
    addend = randn(b, s, d, seed=5).bfloat16()
    ours = tri.hc_post(out, streams, post, comb, addend)
    assert_close(ours, ref.hc_post(out, streams, post, comb, addend))
    assert torch.equal(ours, tri.hc_post(norm.add(out, addend), streams, post, comb))


@pytest.mark.parametrize("hc", HCS)
@pytest.mark.parametrize("b,s,d", SHAPES)
@pytest.mark.parametrize("split", [1, 3])
def test_hc_post_pre_is_hc_post_then_hc_pre(hc, b, s, d, split):
    """The fuse pass's post_pre in one launch: the new streams, collapse, post and comb of hc_post then hc_pre, bit
    for bit as the two launches (each K tile of the streams computed as hc_post does), with and without the
    experts' addend, in one run a token and split over runs (whose last finishes the token, reading streams the
    other runs stored)."""
    out, streams, addend = randn(b, s, d, seed=6), randn(b, s, hc, d, seed=7), randn(b, s, d, seed=8)
    post, comb = 2 * torch.rand(b, s, hc), torch.rand(b, s, hc, hc)
    params = pre_params(hc, d, seed=9)
    kw = dict(iters=20, eps=EPS, norm_eps=NORM_EPS)
    config = {"BLOCK_K": 16, "SPLIT_K": split}
    for extra in (None, addend):
        ours = tri.hc_post_pre(out, streams, post, comb, *params, extra, **kw, config=config)
        new = tri.hc_post(out, streams, post, comb, extra)
        apart = (new, *tri.hc_pre(new, *params, **kw, config=config))
        assert len(ours) == 4 and all(torch.equal(a, b) for a, b in zip(ours, apart, strict=True))
        for a, b in zip(ours, ref.hc_post_pre(out, streams, post, comb, *params, extra, **kw), strict=True):
            assert_close(a, b)


@pytest.mark.parametrize("hc,b,s,d", [(1, 1, 1, 17), (2, 2, 3, 33), (3, 1, 5, 48), (4, 2, 2, 100)])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("quant", [{"eps": 1e-6, "group": 16, "scale_format": "ue8m0", "keep": True},
                                   {"eps": 1e-5, "group": 7, "scale_format": "fp32"},
                                   {"eps": 1e-6, "group": 128, "scale_format": "fp32", "keep": False}],
                         ids=["g16-ue8m0-keep", "g7-fp32", "g128-fp32"])
def test_hc_post_pre_quant_is_hc_post_pre_then_rms_norm_quant(hc, b, s, d, split, quant):
    """The fuse pass's post_pre_quant in one launch: hc_post_pre's four results, then the rms_norm_quant kernel's
    codes, scales (and with keep the normed row) of the collapsed row, bit for bit as the two launches, in one run
    a token and split over runs (the norm then runs in the last run to arrive), with and without the addend; groups
    that divide D, do not, and exceed it; within fp32 tolerance of the reference (the codes: the same e4m3 values
    where the reference's row agrees, checked as dequantized values)."""
    out, streams, addend = randn(b, s, d, seed=31), randn(b, s, hc, d, seed=32), randn(b, s, d, seed=33)
    post, comb = 2 * torch.rand(b, s, hc), torch.rand(b, s, hc, hc)
    params, weight = pre_params(hc, d, seed=34), torch.rand(d) + 0.5
    kw = dict(iters=20, eps=EPS, norm_eps=NORM_EPS)
    config = {"BLOCK_K": 16, "SPLIT_K": split}
    keep = quant.get("keep", False)
    for extra in (None, addend):
        ours = hyper_quant.hc_post_pre_quant(out, streams, post, comb, *params, weight, extra, **kw, quant=quant,
                                             config=config)
        mixed = tri.hc_post_pre(out, streams, post, comb, *params, extra, **kw, config=config)
        apart = (*mixed, *norm.rms_norm_quant(mixed[1], weight, **quant))
        assert len(ours) == 6 + keep and ours[4].dtype == torch.float8_e4m3fn
        assert all(torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                               b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
                   for a, b in zip(ours, apart, strict=True))
        expected = ref_quantized.hc_post_pre_quant(out, streams, post, comb, *params, weight, extra, **kw, quant=quant)
        for a, b in zip(ours[:4], expected[:4], strict=True):
            assert_close(a, b)
        group = quant["group"]
        dequant = [(c.float() * sc.repeat_interleave(group, -1)[..., :d]) for c, sc in (ours[4:6], expected[4:6])]
        assert_close(*dequant, rtol=0.13, atol=1e-5)  # one e4m3 step where a last-bit difference crosses a tie
        if keep:
            assert_close(ours[6], expected[6])


def test_hc_post_pre_quant_checks_its_norm():
    hc, d = 2, 17
    streams, out, post, comb = randn(1, 2, hc, d), randn(1, 2, d), torch.rand(1, 2, hc), torch.rand(1, 2, hc, hc)
    args = (out, streams, post, comb, *pre_params(hc, d))
    kw = dict(iters=20, eps=EPS, norm_eps=NORM_EPS)
    q = {"eps": 1e-6, "group": 16, "scale_format": "fp32"}
    cases = [
        (lambda: hyper_quant.hc_post_pre_quant(*args, torch.ones(d + 1), **kw, quant=q), "norm_weight: expected shape"),
        (lambda: hyper_quant.hc_post_pre_quant(*args, torch.ones(d), **kw, quant={**q, "scale_format": "e5m2"}),
         "scale_format 'e5m2' is not supported"),
        (lambda: hyper_quant.hc_post_pre_quant(*args, torch.ones(d), **kw, quant={**q, "group": 0}), "group: expected"),
        (lambda: hyper_quant.hc_post_pre_quant(*args, torch.ones(d), **kw, quant={"eps": 1e-6}), "quant: expected"),
        (lambda: hyper_quant.hc_post_pre_quant(*args, torch.ones(d), **kw, quant={**q, "keep": 1}), "keep must be"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()


@pytest.mark.parametrize("hc", HCS)
@pytest.mark.parametrize("b,s,d", SHAPES)
def test_hc_head(hc, b, s, d):
    streams = randn(b, s, hc, d, seed=5)
    args = (streams, *head_params(hc, d))
    assert_close(tri.hc_head(*args, eps=EPS, norm_eps=NORM_EPS), ref.hc_head(*args, eps=EPS, norm_eps=NORM_EPS))


@pytest.mark.parametrize("iters", [0, 1, 2, 7])
def test_hc_pre_iteration_counts(iters):
    streams = randn(2, 3, 3, 33, seed=6)
    args, kw = (streams, *pre_params(3, 33)), dict(iters=iters, eps=1e-3, norm_eps=1e-5)
    for ours, expected in zip(tri.hc_pre(*args, **kw), ref.hc_pre(*args, **kw), strict=True):
        assert_close(ours, expected)


def test_hc_pre_comb_is_doubly_stochastic():
    streams = randn(2, 4, 4, 48, seed=7, scale=30.0)  # large values: the RMSNorm brings them back
    args = (streams, *pre_params(4, 48, comb_scale=8.0))  # a peaky softmax before Sinkhorn
    kw = dict(iters=20, eps=EPS, norm_eps=NORM_EPS)
    ours, expected = tri.hc_pre(*args, **kw), ref.hc_pre(*args, **kw)
    for o, e in zip(ours, expected, strict=True):
        assert_close(o, e)
    comb = ours[2]  # columns were normalised last; rows converge more slowly from a peaky start
    torch.testing.assert_close(comb.sum(-2), torch.ones(2, 4, 4), rtol=0, atol=1e-5)
    torch.testing.assert_close(comb.sum(-1), torch.ones(2, 4, 4), rtol=0, atol=0.1)


@pytest.mark.parametrize("config", [{"BLOCK_K": 16, "BLOCK_D": 16}, {"BLOCK_K": 64, "BLOCK_D": 32, "num_warps": 1}])
def test_several_tiles(config):
    """Small tiles: the projection loops over many K tiles and the collapse over many D tiles."""
    hc, b, s, d = 3, 2, 2, 100
    streams, out = randn(b, s, hc, d, seed=8), randn(b, s, d, seed=9)
    kw = dict(iters=20, eps=EPS, norm_eps=NORM_EPS)
    pre_args, head_args = (streams, *pre_params(hc, d)), (streams, *head_params(hc, d))
    expected = ref.hc_pre(*pre_args, **kw)
    for ours, e in zip(tri.hc_pre(*pre_args, **kw, config=config), expected, strict=True):
        assert_close(ours, e)
    assert_close(tri.hc_head(*head_args, eps=EPS, norm_eps=NORM_EPS, config=config),
                 ref.hc_head(*head_args, eps=EPS, norm_eps=NORM_EPS))
    assert_close(tri.hc_post(out, streams, expected[1], expected[2], config=config),
                 ref.hc_post(out, streams, expected[1], expected[2]))
    assert torch.equal(tri.hc_expand(out, hc=hc, config=config), ref.hc_expand(out, hc=hc))


@pytest.mark.parametrize("hc,b,s,d,split", [(4, 1, 1, 100, 2), (3, 2, 3, 33, 3), (5, 1, 2, 17, 1000), (1, 1, 1, 48, 2)])
def test_split_projections(hc, b, s, d, split):
    """SPLIT_K (on a GPU: where the tokens leave SMs idle, a decode step): each token's projection runs in SPLIT
    K spans, and the last of its programs to arrive adds the partial records in order and finishes the token;
    SPLIT_K past the number of K tiles is capped. The arrival counters are left zero. The interpreter runs the
    programs one after another, so a program that finished early would read its token's uninitialized records."""
    from v4c.targets.triton.kernels.common import tile_counters
    streams = randn(b, s, hc, d, seed=40 + d)
    config = {"BLOCK_K": 16, "BLOCK_D": 16, "SPLIT_K": split}
    kw = dict(iters=20, eps=EPS, norm_eps=NORM_EPS)
    pre_args, head_args = (streams, *pre_params(hc, d, comb_scale=3.0)), (streams, *head_params(hc, d))
    for ours, e in zip(tri.hc_pre(*pre_args, **kw, config=config), ref.hc_pre(*pre_args, **kw), strict=True):
        assert_close(ours, e)
    assert_close(tri.hc_head(*head_args, eps=EPS, norm_eps=NORM_EPS, config=config),
                 ref.hc_head(*head_args, eps=EPS, norm_eps=NORM_EPS))
    assert not tile_counters(streams.device, 1).any()


def test_split_projections_are_chosen_from_the_sms(monkeypatch):
    """SPLIT_K 0 (auto): two programs per SM over the tokens, at most one run per K tile, 1 off a GPU."""
    opts = {"BLOCK_K": 512, "SPLIT_K": 0}
    cpu = torch.device("cpu")
    assert tri._split(opts, 1, 16384, cpu)[0] == 1
    monkeypatch.setattr(tri, "sm_count", lambda device: 132)
    assert tri._split(opts, 1, 16384, cpu)[:2] == (32, 512)  # V4-Flash: hc 4 x D 4096, one token: 32 K tiles
    assert tri._split(opts, 16, 16384, cpu)[:2] == (16, 1024)  # 17 asked (cdiv(264, 16)): runs of 2 tiles, 16 of them
    assert tri._split(opts, 264, 16384, cpu)[0] == 1
    assert tri._split({**opts, "SPLIT_K": 4}, 264, 16384, cpu)[:2] == (4, 4096)


@pytest.mark.parametrize("hc", [5, 8])
def test_wider_hc(hc):
    """hc past 4 pads to 8 lanes and (2+hc)*hc comb rows past 64."""
    b, s, d = 1, 2, 17
    streams, out = randn(b, s, hc, d, seed=10), randn(b, s, d, seed=11)
    kw = dict(iters=20, eps=EPS, norm_eps=NORM_EPS)
    args = (streams, *pre_params(hc, d))
    expected = ref.hc_pre(*args, **kw)
    for ours, e in zip(tri.hc_pre(*args, **kw), expected, strict=True):
        assert_close(ours, e)
    post_args = (out, streams, expected[1], expected[2])
    assert_close(tri.hc_post(*post_args), ref.hc_post(*post_args))
    head_args, head_kw = (streams, *head_params(hc, d)), dict(eps=EPS, norm_eps=NORM_EPS)
    assert_close(tri.hc_head(*head_args, **head_kw), ref.hc_head(*head_args, **head_kw))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_fp32(dtype):
    hc, b, s, d = 2, 1, 3, 33
    streams, out = randn(b, s, hc, d, seed=12).to(dtype), randn(b, s, d, seed=13).to(dtype)
    fn, base, scale = (t.to(dtype) for t in pre_params(hc, d))
    kw = dict(iters=20, eps=EPS, norm_eps=NORM_EPS)
    expected = ref.hc_pre(streams, fn, base, scale, **kw)
    for ours, e in zip(tri.hc_pre(streams, fn, base, scale, **kw), expected, strict=True):
        assert_close(ours, e)
    post, comb = expected[1].to(dtype), expected[2].to(dtype)
    assert_close(tri.hc_post(out, streams, post, comb), ref.hc_post(out, streams, post, comb))
    assert torch.equal(tri.hc_expand(out, hc=hc), ref.hc_expand(out, hc=hc))
    hf, hb, hs = (t.to(dtype) for t in head_params(hc, d))
    assert_close(tri.hc_head(streams, hf, hb, hs, eps=EPS, norm_eps=NORM_EPS),
                 ref.hc_head(streams, hf, hb, hs, eps=EPS, norm_eps=NORM_EPS))


def test_non_contiguous_inputs():
    hc, b, s, d = 2, 2, 3, 17
    streams = randn(b, hc, s, d, seed=14).transpose(1, 2)  # [B, S, hc, D], strided
    out = randn(b, d, s, seed=15).transpose(1, 2)
    assert not streams.is_contiguous() and not out.is_contiguous()
    kw = dict(iters=20, eps=EPS, norm_eps=NORM_EPS)
    args = (streams, *pre_params(hc, d))
    expected = ref.hc_pre(*args, **kw)
    for ours, e in zip(tri.hc_pre(*args, **kw), expected, strict=True):
        assert_close(ours, e)
    comb_t = expected[2].transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, strided
    assert_close(tri.hc_post(out, streams, expected[1], comb_t), ref.hc_post(out, streams, expected[1], comb_t))
    assert torch.equal(tri.hc_expand(out, hc=hc), ref.hc_expand(out, hc=hc))


def test_empty_batch():
    hc, d = 2, 17
    streams, out = torch.zeros(0, 3, hc, d), torch.zeros(0, 3, d)
    collapsed, post, comb = tri.hc_pre(streams, *pre_params(hc, d), iters=20, eps=EPS, norm_eps=NORM_EPS)
    assert (collapsed.shape, post.shape, comb.shape) == ((0, 3, d), (0, 3, hc), (0, 3, hc, hc))
    assert tri.hc_post(out, streams, post, comb).shape == (0, 3, hc, d)
    assert tri.hc_expand(out, hc=hc).shape == (0, 3, hc, d)
    assert tri.hc_head(streams, *head_params(hc, d), eps=EPS, norm_eps=NORM_EPS).shape == (0, 3, d)


@pytest.mark.slow
@pytest.mark.parametrize("hc", HCS)
def test_hc_pre_longer_sequences(hc):
    b, s, d = 2, 16, 100
    streams = randn(b, s, hc, d, seed=16, scale=3.0)
    args, kw = (streams, *pre_params(hc, d, comb_scale=4.0)), dict(iters=20, eps=EPS, norm_eps=NORM_EPS)
    for ours, e in zip(tri.hc_pre(*args, **kw), ref.hc_pre(*args, **kw), strict=True):
        assert_close(ours, e)


# --- unsupported input -----------------------------------------------------------------------------
def test_unsupported_inputs_raise_clear_errors():
    hc, d = 2, 17
    streams, out, post, comb = randn(1, 2, hc, d), randn(1, 2, d), torch.rand(1, 2, hc), torch.rand(1, 2, hc, hc)
    fn, base, scale = pre_params(hc, d)
    hfn, hbase, hscale = head_params(hc, d)
    kw = dict(eps=EPS, norm_eps=NORM_EPS)

    def pre(*args, iters=20, **extra):
        return tri.hc_pre(*args, iters=iters, **{**kw, **extra})

    cases = [
        (lambda: tri.hc_expand(randn(2, d), hc=hc), "x: expected 3 dimensions"),
        (lambda: tri.hc_expand(out, hc=9), "hc: expected an int with 1 <= hc <= 8"),
        (lambda: tri.hc_expand(out, hc=0), "hc: expected an int"),
        (lambda: tri.hc_expand(out.to(torch.int32), hc=hc), "x: dtype torch.int32 is not supported"),
        (lambda: pre(streams[0], fn, base, scale), "streams: expected 4 dimensions"),
        (lambda: pre(randn(1, 1, 9, 4), fn, base, scale), "streams: hc = 9 is not supported"),
        (lambda: pre(streams, fn[:, :-1], base, scale), "fn: expected shape [8, 34]"),
        (lambda: pre(streams, fn, base[:-1], scale), "base: expected shape [8]"),
        (lambda: pre(streams, fn, base, scale[:1]), "scale: expected shape [3]"),
        (lambda: pre(streams, fn, base, scale, iters=2.0), "iters: expected an int"),
        (lambda: pre(streams, fn, base, scale, eps=None), "eps: expected a number"),
        (lambda: pre(streams, fn.to("meta"), base, scale), "tensors on different devices"),
        (lambda: pre(streams, fn, base, scale, config={"BLOCK_K": 24}), "config['BLOCK_K']: expected a positive power"),
        (lambda: pre(streams, fn, base, scale, config={"BLOCK_N": 16}), "config: unknown keys ['BLOCK_N']"),
        (lambda: tri.hc_post(out[..., :-1], streams, post, comb), "out: expected shape [1, 2, 17]"),
        (lambda: tri.hc_post(out, streams, post[..., :1], comb), "post: expected shape [1, 2, 2]"),
        (lambda: tri.hc_post(out, streams, post, comb[..., :1]), "comb: expected shape [1, 2, 2, 2]"),
        (lambda: tri.hc_post(out, streams, post, comb, out[:, :1]), "addend: expected shape [1, 2, 17]"),
        (lambda: tri.hc_head(streams, fn, base, scale, **kw), "fn: expected shape [2, 34]"),
        (lambda: tri.hc_head(streams, hfn, hbase, scale, **kw), "scale: expected shape [1]"),
        (lambda: tri.hc_head(streams.double(), hfn, hbase, hscale, **kw), "streams: dtype torch.float64"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()

"""Triton projection / embedding launchers (targets/triton/kernels/gemm.py) against the runtime's
torch kernels, run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py).

Tolerances: every launcher accumulates in fp32, and its inputs (bf16 / f16 / dequantized e4m3
weights, quantized activations) are converted to fp32 exactly, so the only difference from the
reference is fp32 summation order: rtol 1e-5, atol 2e-5 (outputs here are O(10), K <= 300) for
every weight dtype. Quantized activations must be bit-identical (checked through an identity
weight), and embeddings are exact gathers (compared with torch.equal).
"""

import pytest
import torch

from v4c.runtime.kernels.basic import embed as ref_embed
from v4c.runtime.kernels.basic import grouped_linear as ref_grouped_linear
from v4c.runtime.kernels.basic import linear as ref_linear
from v4c.runtime.kernels.quantized import embed_fp8 as ref_embed_fp8
from v4c.runtime.kernels.quantized import grouped_linear_fp8 as ref_grouped_linear_fp8
from v4c.runtime.kernels.quantized import linear_fp8 as ref_linear_fp8
from v4c.runtime.quant import fake_quant_act, quant_fp8
from v4c.targets.triton.kernels import common
from v4c.targets.triton.kernels import gemm as gemm_module
from v4c.targets.triton.kernels import embed as embed_module
from v4c.targets.triton.kernels.embed import embed, embed_fp8
from v4c.targets.triton.kernels.gemm import (FP8_DOT_MIN_K, LAUNCHERS, fp8_dot_supported,
                                             grouped_linear, grouped_linear_fp8, linear, linear_fp8)

TOL = {torch.float32: dict(rtol=1e-5, atol=2e-5), torch.bfloat16: dict(rtol=1e-5, atol=2e-5),
       torch.float16: dict(rtol=1e-5, atol=2e-5), torch.float8_e4m3fn: dict(rtol=1e-5, atol=2e-5)}

ACTS = [
    {"mode": "dynamic", "group": 32, "scale_format": "fp32"},
    {"mode": "dynamic", "group": 128, "scale_format": "ue8m0"},
    {"mode": "dynamic", "group": 16, "scale_format": "ue8m0"},
    {"mode": "static", "scale": 0.0173},
    {"mode": "none"},
]


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def close(ours, ref, dtype=torch.float32):
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, **TOL[dtype])


def test_launchers_are_registered():
    assert set(LAUNCHERS) == {"linear", "grouped_linear", "linear_fp8", "grouped_linear_fp8", "linear_cat",
                              "linear_fp8_cat"}
    assert set(embed_module.LAUNCHERS) == {"embed", "embed_fp8"}


# --- plain projections -------------------------------------------------------------------------
@pytest.mark.parametrize("lead,k,n", [((1,), 1, 1), ((3,), 7, 5), ((2, 17), 33, 50), ((97,), 50, 17), ((), 17, 3)])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear(lead, k, n, wdtype):
    x, w = randn(*lead, k, seed=1), randn(n, k, seed=2, dtype=wdtype)
    close(linear(x, w), ref_linear(x, w), wdtype)


def test_linear_strided_inputs_and_config():
    x = randn(33, 2, 50, seed=3).transpose(0, 1)  # non-contiguous [2, 33, 50]
    w = randn(50, 17, seed=4).t()  # [17, 50], column-major
    x16 = randn(7, 50, seed=5, dtype=torch.bfloat16)
    close(linear(x, w, config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}), ref_linear(x, w))
    close(linear(x16, w), ref_linear(x16, w))


@pytest.mark.parametrize("groups,r,k", [(1, 5, 33), (3, 17, 7), (4, 3, 50)])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_grouped_linear(groups, r, k, wdtype):
    x, w = randn(2, 3, groups, k, seed=6), randn(groups * r, k, seed=7, dtype=wdtype)
    close(grouped_linear(x, w, groups=groups), ref_grouped_linear(x, w, groups=groups), wdtype)


# --- FP8 projections ---------------------------------------------------------------------------
def fp8_weight(n, k, block, fmt, seed=8):
    return quant_fp8(randn(n, k, seed=seed), block, fmt)


@pytest.mark.parametrize("act", ACTS, ids=lambda a: "-".join(str(v) for v in a.values()))
@pytest.mark.parametrize("block,fmt", [([128, 128], "fp32"), ([1, 32], "ue8m0"), ([16, 32], "fp32"), ("row", "ue8m0"),
                                       ("tensor", "fp32")])
def test_linear_fp8(act, block, fmt):
    m, k, n = 17, 97, 50
    block = {"row": [1, k], "tensor": [n, k]}[block] if isinstance(block, str) else block
    x = randn(m, k, seed=9) * 3
    w, s = fp8_weight(n, k, block, fmt)
    close(linear_fp8(x, w, s, block=block, act=act), ref_linear_fp8(x, w, s, block=block, act=act), w.dtype)


@pytest.mark.parametrize("lead,k,n", [((1,), 7, 1), ((2, 3), 33, 17), ((), 50, 3)])
def test_linear_fp8_odd_sizes(lead, k, n):
    x = randn(*lead, k, seed=10, dtype=torch.bfloat16)
    w, s = fp8_weight(n, k, [1, 32], "fp32")
    act = {"mode": "dynamic", "group": 32, "scale_format": "ue8m0"}
    close(linear_fp8(x, w, s, block=[1, 32], act=act), ref_linear_fp8(x, w, s, block=[1, 32], act=act))


def near_pow2_group(row, col, e, ulps):
    """At x[row, col]: an amax `ulps` ulps above 448 * 2^e (its UE8M0 scale just above a power of two:
    exactly 2^(e+1), where exp2(ceil(log2(.))) gives 2^e); after it (3, -5, 7) * 2^(e-9), subnormal
    codes under 2^e that land on other values under the exact scale."""
    row[col] = (torch.tensor(448 * 2.0**e).view(torch.int32) + ulps).view(torch.float32)
    row[col + 1:col + 4] = torch.tensor([3.0, -5.0, 7.0]) * 2.0**(e - 9)


def tricky_activations(rows=8, k=64):
    """Values at e4m3 rounding ties, carries into the next binade and subnormals, with group
    amaxes of exactly 448 (scale 1, also a power of two), amaxes just above 448 * 2^e and random ones."""
    ties = torch.tensor([1.0625, 1.1875, 3.9, 1.96, 15.5, 0.5 * 2**-9, 1.5 * 2**-9, 2.5 * 2**-9, 2**-7 * 1.0625,
                         -1.0625, -2.5 * 2**-9, 240.0, 232.0, 440.0, 300.0, 447.9])
    x = randn(rows, k, seed=11) * torch.logspace(-3, 2, k)
    x[0, :16], x[0, 16] = ties, 448.0
    x[1, :16], x[1, 31] = ties * 3, -448.0
    x[2] = torch.randint(-(2**20), 2**20, (k,), generator=torch.Generator().manual_seed(12)) * 2.0**-14
    x[3], x[4] = randn(k, seed=23) * 2.0**-30, randn(k, seed=24) * 2.0**-40
    for row, col, e, ulps in [(3, 0, -10, 1), (3, 20, -12, 2), (3, 40, -3, 3), (4, 5, -20, 1), (4, 17, -22, 1),
                              (4, 50, -6, 1)]:
        near_pow2_group(x[row], col, e, ulps)
    return x


EXACT_ACTS = [{"mode": "dynamic", "group": 32, "scale_format": "fp32"},
              {"mode": "dynamic", "group": 64, "scale_format": "ue8m0"},
              {"mode": "dynamic", "group": 16, "scale_format": "ue8m0"},
              {"mode": "static", "scale": 1.0}, {"mode": "static", "scale": 0.37}]


# The fp8 dot needs K tiles of >= 32, which a group of 16 cannot hold (test_fp8_dot_takes_only_what_it_can).
@pytest.mark.parametrize("act,fp8_dot", [(a, False) for a in EXACT_ACTS]
                         + [(a, True) for a in EXACT_ACTS if a.get("group", FP8_DOT_MIN_K) >= FP8_DOT_MIN_K])
def test_fused_activation_quantization_is_exact(act, fp8_dot):
    """Both dots: the fp32 one over fake-quantized tiles, and the fp8 one over e4m3 codes (scaled after);
    dynamic activations also quantized once by their own kernel (QUANT_ONCE)."""
    x = tricky_activations()
    eye = torch.eye(x.shape[-1]).to(torch.float8_e4m3fn)  # y = q(x) I, one nonzero term per output
    config = {"BLOCK_K": 32, "FP8_DOT": True} if fp8_dot else {"BLOCK_K": 16, "FP8_DOT": False}
    for once in ([False, True] if act["mode"] == "dynamic" else [False]):
        y = linear_fp8(x, eye, torch.ones(1, 1), block=list(eye.shape), act=act, config={**config, "QUANT_ONCE": once})
        assert torch.equal(y, fake_quant_act(x, act)), f"QUANT_ONCE {once}"


@pytest.mark.parametrize("m,groups,k,n,block,group", [(70, 1, 160, 33, [16, 32], 32), (5, 3, 50, 17, [1, 32], 16),
                                                      (9, 2, 97, 40, [128, 128], 128), (66, 1, 64, 70, [1, 32], 64)])
def test_activations_quantized_once_equal_the_fused_path(m, groups, k, n, block, group):
    """QUANT_ONCE (a separate quantization kernel, then e4m3 codes in the K loop) gives the fused path's
    output bit for bit, with both dots, split-K and grouped weights; "auto" takes it from 64 tokens on."""
    x = randn(m, groups, k, seed=41)
    w, s = fp8_weight(groups * n, k, block, "ue8m0", seed=42)
    for fmt in ("fp32", "ue8m0"):
        act = {"mode": "dynamic", "group": group, "scale_format": fmt}
        ref = ref_grouped_linear_fp8(x, w, s, groups=groups, block=block, act=act)
        for extra in ({"FP8_DOT": False}, {"FP8_DOT": "auto", "BLOCK_K": 32}, {"SPLIT_K": 2, "BLOCK_N": 16}):
            if extra.get("BLOCK_K", 16) > group:
                continue
            fused = grouped_linear_fp8(x, w, s, groups=groups, block=block, act=act,
                                       config={**extra, "QUANT_ONCE": False})
            once = grouped_linear_fp8(x, w, s, groups=groups, block=block, act=act,
                                      config={**extra, "QUANT_ONCE": True})
            assert torch.equal(once, fused), f"{act} {extra}"
            close(once, ref)
    assert gemm_module.quant_once("auto", True, 64, 2, "linear_fp8")
    assert not gemm_module.quant_once("auto", True, 63, 2, "linear_fp8")
    assert not gemm_module.quant_once("auto", True, 4096, 1, "linear_fp8")


@pytest.mark.parametrize("m,k,n,block,group", [(5, 50, 17, [1, 32], 16), (70, 160, 33, [16, 32], 32),
                                               (3, 97, 40, [128, 128], 128), (1, 64, 70, [1, 32], 64)])
def test_pre_quantized_activations_equal_the_fused_path(m, k, n, block, group):
    """x_scale (the fuse pass: rms_norm_quant wrote the e4m3 codes and their group scales): the GEMM reads
    them and gives, bit for bit, what the unfused steps give (the rms_norm kernel, then the GEMM quantizing
    its output), with both dots and split-K; and the reference kernel's result on the reference's codes."""
    from v4c.runtime.kernels.quantized import rms_norm_quant as ref_rms_norm_quant
    from v4c.targets.triton.kernels.norm import rms_norm, rms_norm_quant
    h = randn(2, m, k, seed=45) * 3
    w, s = fp8_weight(n, k, block, "ue8m0", seed=46)
    for fmt in ("fp32", "ue8m0"):
        act = {"mode": "dynamic", "group": group, "scale_format": fmt}
        codes, scales = rms_norm_quant(h, eps=1e-6, group=group, scale_format=fmt)
        ref_codes, ref_scales = ref_rms_norm_quant(h, eps=1e-6, group=group, scale_format=fmt)
        ref = ref_linear_fp8(ref_codes, w, s, ref_scales, block=block, act=act)
        for extra in ({"FP8_DOT": False}, {"FP8_DOT": "auto", "BLOCK_K": 32}, {"SPLIT_K": 2, "BLOCK_N": 16}):
            if extra.get("BLOCK_K", 16) > group:
                continue
            unfused = linear_fp8(rms_norm(h, eps=1e-6), w, s, block=block, act=act, config=extra)
            pre = linear_fp8(codes, w, s, scales, block=block, act=act, config=extra)
            assert torch.equal(pre, unfused), f"{act} {extra}"
            close(pre, ref)
        c_t, s_t = codes.transpose(0, 1), scales.transpose(0, 1)  # strided codes and scales: read in place
        assert torch.equal(linear_fp8(c_t, w, s, s_t, block=block, act=act),
                           linear_fp8(c_t.contiguous(), w, s, s_t.contiguous(), block=block, act=act))


def test_pre_quantized_activations_are_checked():
    wq, s = fp8_weight(5, 50, [1, 32], "fp32")
    codes, scales = randn(3, 50).to(torch.float8_e4m3fn), torch.ones(3, 2)
    dyn = {"mode": "dynamic", "group": 32}
    cases = [
        (lambda: linear_fp8(codes, wq, s, block=[1, 32], act=dyn), "x: dtype"),  # codes need their scales
        (lambda: linear_fp8(randn(3, 50), wq, s, scales, block=[1, 32], act=dyn), "x: dtype"),
        (lambda: linear_fp8(codes, wq, s, torch.ones(3, 3), block=[1, 32], act=dyn),
         r"x_scale: expected fp32 \[3, 2\]"),
        (lambda: linear_fp8(codes, wq, s, scales.double(), block=[1, 32], act=dyn), "x_scale: dtype"),
        (lambda: linear_fp8(codes, wq, s, scales, block=[1, 32], act={"mode": "static", "scale": 1.0}),
         "act mode dynamic"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_quant_once_needs_dynamic_activations():
    x = randn(3, 64, seed=43)
    w, s = fp8_weight(16, 64, [1, 32], "fp32", seed=44)
    for act in ({"mode": "static", "scale": 0.5}, {"mode": "none"}):
        with pytest.raises(ValueError, match="QUANT_ONCE.*needs dynamic"):
            linear_fp8(x, w, s, block=[1, 32], act=act, config={"QUANT_ONCE": True})
    with pytest.raises(ValueError, match="QUANT_ONCE"):
        linear_fp8(x, w, s, block=[1, 32], act={"mode": "dynamic", "group": 32}, config={"QUANT_ONCE": "yes"})


@pytest.mark.parametrize("act", ACTS, ids=lambda a: "-".join(str(v) for v in a.values()))
@pytest.mark.parametrize("split", [1, 2, 3, 64])
def test_split_k_and_both_dots(act, split):
    """Split-K partial sums (activation groups divided among programs, then added in order) and the fp8 /
    fp32 dots agree with the reference; SPLIT_K beyond the number of groups is capped."""
    m, k, n = 5, 160, 33
    x = randn(m, k, seed=25) * 2
    w, s = fp8_weight(n, k, [16, 32], "ue8m0", seed=26)
    ref = ref_linear_fp8(x, w, s, block=[16, 32], act=act)
    for fp8_dot in (False, "auto"):
        config = {"BLOCK_K": 32, "SPLIT_K": split, "FP8_DOT": fp8_dot}
        close(linear_fp8(x, w, s, block=[16, 32], act=act, config=config), ref, w.dtype)
    wf = randn(n, k, seed=27, dtype=torch.bfloat16)
    close(linear(x, wf, config={"BLOCK_K": 32, "SPLIT_K": split}), ref_linear(x, wf), wf.dtype)


@pytest.mark.parametrize("groups,m,split", [(1, 5, 3), (2, 19, 4), (3, 1, 2)])
def test_split_k_sums_in_the_kernel(groups, m, split):
    """SUM_IN_KERNEL (the default wherever split-K applies): the last program of each output tile adds the
    partial sums in split order, which gives the torch.sum path's result bit for bit, with one launch less, over
    several M, N and group tiles; the arrival counters are left zero for the next launch. The interpreter runs
    the programs one after another, so a program that summed before the last split arrived would read the
    partial sums' uninitialized memory."""
    k, n = 160, 33
    x = randn(m, groups, k, seed=30) * 2
    w, s = fp8_weight(groups * n, k, [16, 32], "fp32", seed=31)
    act = {"mode": "dynamic", "group": 32}
    ref = ref_grouped_linear_fp8(x, w, s, groups=groups, block=[16, 32], act=act)
    runs = {}
    for in_kernel in (True, False, "auto"):
        config = {"BLOCK_K": 32, "BLOCK_M": 16, "BLOCK_N": 16, "SPLIT_K": split, "SUM_IN_KERNEL": in_kernel}
        runs[in_kernel] = grouped_linear_fp8(x, w, s, groups=groups, block=[16, 32], act=act, config=config)
        close(runs[in_kernel], ref, w.dtype)
    assert torch.equal(runs[True], runs[False]) and torch.equal(runs["auto"], runs[True])
    assert not common.tile_counters(x.device, 1).any()
    wf = randn(groups * n, k, seed=32, dtype=torch.bfloat16)
    y = grouped_linear(x, wf, groups=groups, config={"BLOCK_K": 32, "SPLIT_K": split, "SUM_IN_KERNEL": True})
    close(y, ref_grouped_linear(x, wf, groups=groups), wf.dtype)


def test_split_k_sum_in_the_kernel_needs_its_counters(monkeypatch):
    """More output tiles than there are arrival counters: SUM_IN_KERNEL true names why it cannot, 'auto' adds the
    partial sums with torch.sum instead (the same result)."""
    x, w = randn(40, 64, seed=33), randn(48, 64, seed=34)
    config = {"BLOCK_K": 16, "BLOCK_M": 16, "BLOCK_N": 16, "SPLIT_K": 2}
    expected = linear(x, w, config={**config, "SUM_IN_KERNEL": False})
    monkeypatch.setattr(common, "TILE_COUNTERS", 8)  # 3 x 3 tiles here
    with pytest.raises(ValueError, match=r"SUM_IN_KERNEL.*at most 8 arrival counters \(9 here\)"):
        linear(x, w, config={**config, "SUM_IN_KERNEL": True})
    assert torch.equal(linear(x, w, config=config), expected)
    with pytest.raises(ValueError, match="SUM_IN_KERNEL"):
        linear(x, w, config={"SUM_IN_KERNEL": "yes"})


def test_fp8_dot_takes_only_what_it_can():
    x = randn(3, 64, seed=28)
    w, s = fp8_weight(16, 64, [1, 32], "fp32", seed=29)
    dyn = {"mode": "dynamic", "group": 32}
    for act, config, missing in [({"mode": "none"}, {}, "quantized activations"),
                                 ({"mode": "dynamic", "group": 16}, {}, "K tiles of >= 32"),
                                 (dyn, {"BLOCK_K": 16}, "K tiles of >= 32")]:
        with pytest.raises(ValueError, match=f"FP8_DOT.*{missing}"):
            linear_fp8(x, w, s, block=[1, 32], act=act, config={**config, "FP8_DOT": True})
        ref = ref_linear_fp8(x, w, s, block=[1, 32], act=act)
        close(linear_fp8(x, w, s, block=[1, 32], act=act, config=config), ref)
    with pytest.raises(ValueError, match="FP8_DOT.*e4m3 weights"):
        linear(x, randn(16, 64), config={"FP8_DOT": True})
    assert fp8_dot_supported(torch.device("cpu"))  # the interpreter runs it


# --- the warp-specialized K loop (WARP_SPEC: TMA descriptors, tl.range(warp_specialize=True)) ---------------------
WS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "QUANT_ONCE": True}  # QUANT_ONCE: the codes WARP_SPEC reads


@pytest.mark.parametrize("m,groups,k,n,block,split", [(70, 1, 160, 33, [16, 32], 1), (5, 3, 64, 17, [1, 32], 2),
                                                      (9, 2, 256, 40, [128, 128], 3), (1, 1, 96, 70, [1, 32], 1)])
def test_warp_specialized_k_loop_equals_the_pointer_loop(m, groups, k, n, block, split):
    """WARP_SPEC (the e4m3 tiles loaded through tensor descriptors over the codes [M, G*K] and the weight [G*R, K],
    in a loop Triton warp-specializes on sm_90) gives the pointer loop's result bit for bit at the same tiles and
    split, for fp32 activations (quantized once first, as WARP_SPEC implies) and for rms_norm_quant's codes, over
    partial M and N tiles, groups whose weight rows the descriptor reads across, and split-K; the reference within
    the projection tolerance. (The interpreter runs the loop's code; the split into warp groups is a GPU's.)"""
    x = randn(m, groups, k, seed=90) * 2
    w, s = fp8_weight(groups * n, k, block, "ue8m0", seed=91)
    for fmt in ("fp32", "ue8m0"):
        act = {"mode": "dynamic", "group": 32, "scale_format": fmt}
        config = {**WS, "SPLIT_K": split}
        ws = grouped_linear_fp8(x, w, s, groups=groups, block=block, act=act, config={**config, "WARP_SPEC": True})
        assert torch.equal(ws, grouped_linear_fp8(x, w, s, groups=groups, block=block, act=act, config=config))
        close(ws, ref_grouped_linear_fp8(x, w, s, groups=groups, block=block, act=act), w.dtype)
        if groups == 1:  # codes and scales from the fuse pass's rms_norm_quant
            codes, scales = x[:, 0].to(torch.float8_e4m3fn), randn(m, k // 32, seed=101).abs() + 0.5
            pre = linear_fp8(codes, w, s, scales, block=block, act=act, config={**config, "WARP_SPEC": True})
            assert torch.equal(pre, linear_fp8(codes, w, s, scales, block=block, act=act, config=config))


@pytest.mark.parametrize("m,groups,k,n,block", [(70, 1, 160, 33, [16, 32]), (5, 3, 64, 17, [1, 32]),
                                                (9, 2, 256, 40, [128, 128])])
def test_persistent_warp_specialized_loop_equals_the_pointer_loop(m, groups, k, n, block):
    """PERSISTENT (WARP_SPEC's loop over the output tiles of a persistent grid; in the interpreter 2 programs, so
    each takes several tiles: M tiles fastest, then N tiles, then groups) gives the pointer loop's result bit for
    bit, without split-K (the pointer loop at SPLIT_K 1); joined siblings too. It needs WARP_SPEC and no split-K."""
    from v4c.targets.triton.kernels.gemm import linear_fp8_cat
    x = randn(m, groups, k, seed=99) * 2
    w, s = fp8_weight(groups * n, k, block, "ue8m0", seed=100)
    act = {"mode": "dynamic", "group": 32, "scale_format": "fp32"}
    config = {**WS, "SPLIT_K": 1}
    on = {**config, "WARP_SPEC": True, "PERSISTENT": True}
    ours = grouped_linear_fp8(x, w, s, groups=groups, block=block, act=act, config=on)
    assert torch.equal(ours, grouped_linear_fp8(x, w, s, groups=groups, block=block, act=act, config=config))
    if groups == 1:
        sizes = [16, n - 16]
        for y_p, y in zip(linear_fp8_cat(x[:, 0], w, s, sizes=sizes, block=block, act=act, config=on),
                          linear_fp8_cat(x[:, 0], w, s, sizes=sizes, block=block, act=act, config=config)):
            assert torch.equal(y_p, y)
    for bad, message in (({**on, "WARP_SPEC": False}, r"PERSISTENT.*the warp-specialized K loop \(WARP_SPEC\)"),
                         ({**on, "SPLIT_K": 2}, r"PERSISTENT.*no split-K")):
        with pytest.raises(ValueError, match=message):
            grouped_linear_fp8(x, w, s, groups=groups, block=block, act=act, config=bad)


def test_warp_specialized_k_loop_in_the_fused_and_joined_gemms():
    """The GEMMs built on the same kernel take WARP_SPEC too, bit for bit with their pointer loop: joined siblings
    (linear_fp8_cat: each N tile's weight rows are its sibling's, read through the one weight descriptor), the SwiGLU
    and the RMSNorm folded in (both quantized once by their kernels first)."""
    from v4c.targets.triton.kernels.gemm import linear_fp8_cat
    from v4c.targets.triton.kernels.gemm_fused import norm_linear_fp8, swiglu_linear_fp8
    m, k, sizes = 37, 96, [48, 16, 33]
    x, u, nw = randn(m, k, seed=94) * 2, randn(m, k, seed=95) * 2, randn(k, seed=96).abs() + 0.5
    w, s = fp8_weight(sum(sizes), k, [16, 32], "ue8m0", seed=97)
    act = {"mode": "dynamic", "group": 32, "scale_format": "ue8m0"}
    runs = {}
    for ws in (False, True):
        config = {**WS, "WARP_SPEC": ws, "SPLIT_K": 2}
        runs[ws] = (linear_fp8_cat(x, w, s, sizes=sizes, block=[16, 32], act=act, config=config),
                    swiglu_linear_fp8(x, u, w, s, block=[16, 32], act=act, limit=1.5, config=config),
                    norm_linear_fp8(x, nw, w, s, eps=1e-6, block=[16, 32], act=act, sizes=sizes, config=config))
    for a, b in zip(runs[True], runs[False]):
        for y_ws, y in zip(a if isinstance(a, tuple) else [a], b if isinstance(b, tuple) else [b]):
            assert torch.equal(y_ws, y)


def test_warp_specialized_k_loop_takes_only_what_it_can():
    """WARP_SPEC true names what it lacks: dynamic activations (it reads e4m3 codes), the fp8 dot, K a multiple of
    the K tile (a descriptor's K tiles would run into the next group's codes), weight rows as TMA reads them
    (16-byte aligned rows and row stride); codes that are not contiguous or aligned are copied, not refused. It is
    off by default, and 'auto' leaves it off (the tuner turns it on where it is faster)."""
    x = randn(3, 64, seed=92)
    w, s = fp8_weight(16, 64, [1, 32], "fp32", seed=93)
    dyn = {"mode": "dynamic", "group": 32}
    on = {"WARP_SPEC": True, "BLOCK_K": 32}
    cases = [
        (lambda: linear_fp8(x, w, s, block=[1, 32], act={"mode": "static", "scale": 0.5}, config=on),
         "WARP_SPEC.*dynamic activations"),
        (lambda: linear_fp8(x, w, s, block=[1, 32], act={"mode": "none"}, config=on), "WARP_SPEC.*dynamic"),
        (lambda: linear_fp8(x, w, s, block=[1, 32], act=dyn, config={**on, "FP8_DOT": False}),
         r"WARP_SPEC.*the fp8 dot \(FP8_DOT\)"),
        (lambda: linear(x, randn(16, 64), config=on), "WARP_SPEC.*the fp8 dot"),
        (lambda: linear_fp8(randn(3, 80), *fp8_weight(16, 80, [1, 32], "fp32"), block=[1, 32], act=dyn, config=on),
         r"WARP_SPEC.*K \(80\) a multiple of the K tile \(32\)"),
        (lambda: linear_fp8(x, torch.cat([w, w[:, :8]], 1)[:, :64], s, block=[1, 32], act=dyn, config=on),
         r"WARP_SPEC.*weight rows.*strides \[72, 1\]"),  # rows 72 bytes apart
        (lambda: linear_fp8(x, w, s, block=[1, 32], act=dyn, config={"WARP_SPEC": "yes"}), "WARP_SPEC"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    codes, scales = randn(64, 3, seed=98).t().to(torch.float8_e4m3fn), torch.rand(3, 2) + 0.5  # column-major
    for ragged in (codes, torch.cat([codes.flatten(), codes.flatten()[:1]])[1:].view(3, 64)):  # (1-byte offset)
        assert torch.equal(linear_fp8(ragged, w, s, scales, block=[1, 32], act=dyn, config=on),
                           linear_fp8(ragged, w, s, scales, block=[1, 32], act=dyn, config={"BLOCK_K": 32}))
    expected = linear_fp8(x, w, s, block=[1, 32], act=dyn, config={"BLOCK_K": 32})
    assert torch.equal(linear_fp8(x, w, s, block=[1, 32], act=dyn, config={"BLOCK_K": 32, "WARP_SPEC": "auto"}),
                       expected)


def test_the_tuner_leaves_the_warp_specialized_loop_to_the_bench():
    """configs.CANDIDATES_WS: wrong on an H100 at 128-row tiles, slower at 64 (configs.py); the tuner times none."""
    from v4c.targets.triton.configs import BUCKETS, CANDIDATES_WS, FAMILY, candidates
    assert CANDIDATES_WS and all(c["WARP_SPEC"] for c in CANDIDATES_WS)
    assert all(candidates(op, bucket) for op in ("linear_fp8", "grouped_linear_fp8") for bucket, _ in BUCKETS)
    assert not any(c.get("WARP_SPEC") or c.get("PERSISTENT") for op in FAMILY for bucket, _ in BUCKETS
                   for c in candidates(op, bucket))


@pytest.mark.parametrize("groups,r,k,block", [(1, 5, 33, [16, 32]), (3, 5, 50, [16, 32]), (2, 17, 97, [1, 32]),
                                              (4, 3, 33, [128, 128])])
@pytest.mark.parametrize("act", ACTS[:2] + ACTS[3:], ids=lambda a: a["mode"])
def test_grouped_linear_fp8(groups, r, k, block, act):
    x = randn(2, 3, groups, k, seed=13)
    w, s = fp8_weight(groups * r, k, block, "ue8m0" if block[0] == 1 else "fp32", seed=14)
    ours = grouped_linear_fp8(x, w, s, groups=groups, block=block, act=act)
    close(ours, ref_grouped_linear_fp8(x, w, s, groups=groups, block=block, act=act), w.dtype)


# --- embeddings --------------------------------------------------------------------------------
@pytest.mark.parametrize("v,d", [(1, 1), (50, 33), (97, 7)])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_embed(v, d, wdtype):
    tokens = torch.randint(0, v, (2, 17), generator=torch.Generator().manual_seed(15))
    w = randn(v, d, seed=16, dtype=wdtype)
    assert torch.equal(embed(tokens, w), ref_embed(tokens, w))
    assert torch.equal(embed(tokens.int(), w, config={"BLOCK_T": 4, "BLOCK_D": 16}), ref_embed(tokens, w))


@pytest.mark.parametrize("v,d,block", [(50, 33, [1, 32]), (97, 50, [16, 32]), (17, 7, [128, 128]), (3, 97, [3, 97])])
@pytest.mark.parametrize("fmt", ["fp32", "ue8m0"])
def test_embed_fp8(v, d, block, fmt):
    tokens = torch.randint(0, v, (3, 7), generator=torch.Generator().manual_seed(17))
    w, s = fp8_weight(v, d, block, fmt, seed=18)
    assert torch.equal(embed_fp8(tokens, w, s, block=block), ref_embed_fp8(tokens, w, s, block=block))


# --- rejected inputs ---------------------------------------------------------------------------
def test_rejects_unsupported_inputs():
    x, w = randn(3, 50), randn(5, 50)
    wq, s = fp8_weight(5, 50, [1, 32], "fp32")
    s24 = fp8_weight(5, 50, [1, 24], "fp32")[1]
    dyn = {"mode": "dynamic", "group": 32}
    cases = [
        (lambda: linear(x, wq), "weight: dtype"),
        (lambda: linear(x, randn(5, 49)), "does not match x's K"),
        (lambda: linear(x, w, config={"BLOCK_M": 24}), "power of two"),
        (lambda: linear(x, w, config={"BLOCK": 64}), "unknown keys"),
        (lambda: linear(x, w, config={"SPLIT_K": -1}), "SPLIT_K"),
        (lambda: linear(x, w, config={"FP8_DOT": "yes"}), "FP8_DOT"),
        (lambda: grouped_linear(randn(2, 3, 50), randn(6, 50), groups=2), "groups=2"),
        (lambda: linear_fp8(x, wq, s, block=[1, 32], act={"mode": "dynamic", "group": 20}), "group 20"),
        (lambda: linear_fp8(x, wq, s24, block=[1, 24], act=dyn), "block input size 24"),
        (lambda: linear_fp8(x, wq, s, block=[1, 32], act={"mode": "nvfp4"}), "act:"),
        (lambda: linear_fp8(x, wq, s, block=[2, 16], act=dyn), "scale: shape"),
        (lambda: linear_fp8(x, wq, s.double(), block=[1, 32], act=dyn), "scale: dtype"),
        (lambda: grouped_linear_fp8(x.view(3, 1, 50), wq, s, groups=2, block=[1, 32], act=dyn), "groups: 2"),
        (lambda: embed(torch.tensor([[0, 5]]), w), "tokens: ids"),
        (lambda: embed(torch.zeros(1, 2), w), "tokens: dtype"),
        (lambda: embed_fp8(torch.zeros(1, 2, dtype=torch.long), w, s, block=[1, 32]), "weight: dtype"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# --- larger shapes -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["fp32", "ue8m0"])
def test_linear_fp8_deepseek_blocks(fmt):
    x = randn(2, 65, 300, seed=19)
    w, s = fp8_weight(257, 300, [128, 128], fmt, seed=20)
    act = {"mode": "dynamic", "group": 128, "scale_format": fmt}
    for config in (None, {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128}):
        close(linear_fp8(x, w, s, block=[128, 128], act=act, config=config),
              ref_linear_fp8(x, w, s, block=[128, 128], act=act), w.dtype)
    x3 = randn(5, 8, 300, seed=21)
    close(grouped_linear_fp8(x3, w[:256], s[:2], groups=8, block=[128, 128], act=act),
          ref_grouped_linear_fp8(x3, w[:256], s[:2], groups=8, block=[128, 128], act=act), w.dtype)

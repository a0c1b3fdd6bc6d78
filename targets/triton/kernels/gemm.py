"""Projections: plain and FP8 (e4m3, block-scaled) GEMMs and grouped (block-diagonal) GEMMs (embedding-row
gathers: embed.py; the GEMMs computing a SwiGLU or an RMSNorm of their input: gemm_fused.py).

One GEMM kernel serves all the projection launchers: x [M, G, K] times the weight rows of group g,
W_g = weight[g*R:(g+1)*R] ([R, K]), gives y [M, G, R] (G = 1 for a plain linear). FP8 weights are
dequantized in registers (e4m3 value * block scale). Activation quantization (`act`) is fused:
each K tile lies inside one activation group and one weight block column, the group's amax is
taken per token before its tiles are quantized (common.group_scale: UE8M0 scales are exact powers
of two), and e4m3 rounding is done with exact integer arithmetic (common.fake_quant) so it equals
torch's float8_e4m3fn cast (round to nearest, ties to even) both on a GPU and in the Triton
interpreter (whose own fp8 cast rounds ties away from zero).
"""

import math

import torch
import triton

from .common import (FP8_DOT_MIN_K, cdiv, check, check_tensor, config_switch, fp8_dot_supported, in_kernel_counters,
                     launch_config, native_cvt, next_pow2, result, results, same_device, sm_count, tma_supported)
from .gemm_kernel import _gemm_kernel
from .norm import rms_norm_quant
from .quantize import act_quant, quant_once

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu)
ACT_MODES = {"none": 0, "dynamic": 1, "static": 2}


# --- host-side checks and tiling ---------------------------------------------------------------
def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")  # (torch's blocks are 512-byte aligned)


def _set_tma_allocator() -> None:
    """Tensor descriptors made in a kernel (gemm's TMA_WS) take a global scratch buffer at each launch, which Triton
    asks its allocator for (a per-thread setting, Triton's NullAllocator by default). Where the launching thread has
    none, this sets torch's caching allocator, so a CUDA-graph capture takes the buffer from its own pool; an
    allocator set by the caller is kept."""
    from triton.runtime import _allocation  # (the default is not public; both 3.6 and 3.9 keep it here)
    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_scratch)


def _gemm_config(config, m: int, n: int, name: str) -> dict:
    defaults = {"BLOCK_M": min(64, max(16, next_pow2(m))), "BLOCK_N": min(64, max(16, next_pow2(n))),
                "BLOCK_K": 64, "num_warps": 4, "num_stages": 2, "SPLIT_K": 0, "FP8_DOT": "auto", "QUANT_ONCE": "auto",
                "SUM_IN_KERNEL": "auto", "WARP_SPEC": False, "PERSISTENT": False}
    return launch_config(config, defaults, name, at_least={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})  # tl.dot


def _use_warp_spec(cfg: dict, device, mode: int, fp8_dot: bool, k: int, bk: int, name: str) -> bool:
    """WARP_SPEC (off unless a config turns it on; the tuner times it at prefill): the warp-specialized K loop over
    TMA loads (_gemm_kernel's TMA_WS). It reads the activations as e4m3 codes, so it quantizes them once first."""
    if cfg["WARP_SPEC"] is False:  # (the default: every decode launch, so no needs list built)
        return False
    needs = [(mode == 1, "dynamic activations (act mode 'dynamic')"), (fp8_dot, "the fp8 dot (FP8_DOT)"),
             (k % bk == 0, f"K ({k}) a multiple of the K tile ({bk})"), (tma_supported(device), "an sm_90+ GPU")]
    return config_switch("WARP_SPEC", cfg["WARP_SPEC"], needs, name, auto=False)


def _use_persistent(cfg: dict, ws: bool, name: str) -> bool:
    """PERSISTENT (off unless a config turns it on): WARP_SPEC's loop over the output tiles of a persistent grid,
    so a program's next tile loads while it stores this one (_gemm_kernel's PERSIST); no split-K."""
    if cfg["PERSISTENT"] is False:
        return False
    needs = [(ws, "the warp-specialized K loop (WARP_SPEC)"), (cfg["SPLIT_K"] in (0, 1), "no split-K (SPLIT_K 0 or 1)")]
    return config_switch("PERSISTENT", cfg["PERSISTENT"], needs, name, auto=False)


def _persistent_programs(device, tiles: int) -> int:
    """PERSIST's grid: one program per SM, at most one per tile; in the interpreter (no SMs) 2, so its tile loop
    runs."""
    return max(1, min(tiles, sm_count(device) or 2))


def _tma_operands(codes: torch.Tensor, weight: torch.Tensor, name: str) -> torch.Tensor:
    """The e4m3 codes [M, G, K] as TMA_WS reads them: an e4m3 view, contiguous and 16-byte aligned as its tensor
    descriptor needs (codes that are not, say a view into a planned buffer, are copied: M x G x K bytes). The weight
    [G*R, K] must be so already (rows contiguous, 16-byte aligned, a row stride that is a multiple of 16)."""
    check(weight.stride(-1) == 1 and weight.stride(0) % 16 == 0 and weight.data_ptr() % 16 == 0,
          f"{name}: config['WARP_SPEC'] needs weight rows contiguous, 16-byte aligned, with a row stride that is a "
          f"multiple of 16 (strides {list(weight.stride())})")
    if not codes.is_contiguous() or codes.data_ptr() % 16:
        codes = codes.clone(memory_format=torch.contiguous_format)
    _set_tma_allocator()
    return codes.view(torch.float8_e4m3fn)


def _use_fp8_dot(cfg: dict, device, mode: int, scaled: bool, bk: int, name: str) -> bool:
    """The fp8 dot applies to quantized activations times e4m3 weights, in K tiles of >= 32, on a GPU
    that has it (common.config_switch)."""
    needs = [(mode != 0, "quantized activations (act mode none)"), (scaled, "e4m3 weights"),
             (bk >= FP8_DOT_MIN_K, f"K tiles of >= {FP8_DOT_MIN_K} (BK is {bk})"),
             (fp8_dot_supported(device), "an sm_89+ GPU")]
    return config_switch("FP8_DOT", cfg["FP8_DOT"], needs, name)


def _split_k(cfg: dict, device, spans: int, tiles: int) -> int:
    """Split-K factor: SPLIT_K if set (at most the number of activation groups), else enough splits to
    give every SM of the GPU two programs when the M x N tiles alone do not (1 in the interpreter)."""
    if cfg["SPLIT_K"]:
        return min(cfg["SPLIT_K"], spans)
    return max(1, min(spans, -(-2 * sm_count(device) // tiles)))


def _counters(cfg: dict, device, split: int, tiles: int, name: str, ws: bool = False):
    """The arrival counters when the split-K sums are added in the GEMM kernel itself (common.in_kernel_counters),
    else None: a torch.sum adds them. With WARP_SPEC, 'auto' leaves them to the torch.sum: in the warp-specialized
    kernel the in-kernel sum spills (352 bytes a thread at 128 x 128 tiles on sm_90a,
    bench/results/sm90_ws_candidates.json)."""
    want = False if ws and cfg["SUM_IN_KERNEL"] == "auto" else cfg["SUM_IN_KERNEL"]
    return None if split == 1 else in_kernel_counters(want, device, tiles, name)


def _pick_block_k(k: int, bi: int, group, max_bk: int) -> int:
    """The largest power of two BK in [16, max_bk] such that every K tile lies inside one weight
    block column (BK divides bi, or bi >= K) and one activation group (BK divides it, or it >= K)."""
    bk = min(max_bk, max(16, next_pow2(k)))
    while bk >= 16:
        if (bi >= k or bi % bk == 0) and (group is None or group >= k or group % bk == 0):
            return bk
        bk //= 2
    raise ValueError(f"cannot tile K={k} exactly: block input size {bi} and activation group {group} need a "
                     f"common power-of-two K tile >= 16 (each tile must lie in one block column and one group); "
                     f"supported: block[1] and group multiples of 16 (or >= K)")


def _check_block(block, weight, scale) -> tuple[int, int]:
    check(isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b >= 1 for b in block),
          f"block: expected [bo, bi] positive ints, got {block!r}")
    (bo, bi), (o, i) = block, weight.shape
    need = (-(-o // bo), -(-i // bi))
    check(scale.dim() == 2 and scale.shape[0] >= need[0] and scale.shape[1] >= need[1],
          f"scale: shape {list(scale.shape)} does not cover weight {list(weight.shape)} in blocks {list(block)} "
          f"(expected {list(need)})")
    return bo, bi


def _scale_arg(scale: torch.Tensor):
    """-> (tensor for the kernel, is UE8M0): UE8M0 scales travel as their raw bytes."""
    if scale.dtype == torch.float8_e8m0fnu:
        return scale.view(torch.uint8), True
    return scale, False


def _check_act(act) -> tuple[int, int | None, bool, float]:
    """-> (mode code, group or None, UE8M0 scales, static scale)."""
    check(isinstance(act, dict) and act.get("mode") in ACT_MODES,
          f"act: expected a dict with mode in {list(ACT_MODES)}, got {act!r}")
    mode = ACT_MODES[act["mode"]]
    if mode == 1:
        group, fmt = act.get("group"), act.get("scale_format", "fp32")
        check(isinstance(group, int) and group >= 1, f"act: dynamic mode needs a positive int group, got {group!r}")
        check(fmt in ("fp32", "ue8m0"), f"act: scale_format {fmt!r} is not supported; expected fp32 or ue8m0")
        return mode, group, fmt == "ue8m0", 1.0
    if mode == 2:
        scale = act.get("scale")
        check(isinstance(scale, (int, float)) or (isinstance(scale, torch.Tensor) and scale.numel() == 1),
              f"act: static mode needs a scalar scale, got {scale!r}")
        return mode, None, False, float(scale)
    return mode, None, False, 1.0


MAX_SIBLINGS = 8  # outputs of one linear_cat launch (the kernel's y_ptr, y1 .. y7)


def _sibling_args(outs, sizes, r: int) -> tuple:
    """The kernel's y1 .. y7, e1 .. e7: the other siblings' outputs and where each sibling but the last ends (padded
    with the last output and r, empty siblings that no tile takes); None for a single output (SEGS 1 reads none of
    them, and a None argument costs the launch nothing)."""
    if len(outs) == 1:
        return (None,) * (2 * MAX_SIBLINGS - 2)
    ends = [sum(sizes[:i]) for i in range(1, len(sizes))]
    return (*outs[1:], *outs[-1:] * (MAX_SIBLINGS - len(outs)), *ends, *[r] * (MAX_SIBLINGS - 1 - len(ends)))


def _gemm(name, x3, weight, outs, scale=None, block=(1, 1), act=None, config=None, x_scale3=None, up3=None,
          limit=None, norm=None):
    """x3 [M, G, K] (any strides), weight [G*R, K] -> outs: [out], fp32 [M, G, R] (a contiguous view of the
    result); or, for siblings (linear_cat, G = 1), one fp32 [M, 1, R_i] per sibling, the weight their R_i rows
    one after another. x_scale3: x3 holds e4m3 codes already (rms_norm_quant), with these fp32 group scales
    [M, G, cdiv(K, group)]. up3: the activation is swiglu(x3, up3) (clamped at `limit`), up3 of x3's shape and
    strides (swiglu_linear_fp8). norm: (weight [K], eps): the activation is rms_norm(x3) (G = 1, x3 contiguous;
    norm_linear_fp8), normed in every tile, or with QUANT_ONCE by the rms_norm_quant kernel, once."""
    m, groups, k = x3.shape
    r = weight.shape[0] // groups
    mode, group, ue8m0, static = _check_act(act or {"mode": "none"})
    cfg = _gemm_config(config, m, r, name)
    if m == 0 or r == 0 or k == 0:
        for out in outs:
            out.zero_()
        return
    out, sizes = outs[0], [o.shape[-1] for o in outs]
    bo, bi = block
    bk = _pick_block_k(k, bi if scale is not None else k, group, cfg["BLOCK_K"])
    span = min(group, k) if mode == 1 else bk  # K span of one activation group (static / none: of one tile)
    spans = cdiv(k, span)
    grid_m, grid_n = cdiv(m, cfg["BLOCK_M"]), sum(cdiv(n, cfg["BLOCK_N"]) for n in sizes)
    fp8_dot = _use_fp8_dot(cfg, x3.device, mode, scale is not None, bk, name)
    flat = span == bk or bk >= k  # every activation group (or span) is one K tile: a single pipelined K loop
    ws = _use_warp_spec(cfg, x3.device, mode, fp8_dot, k, bk, name)
    persist = _use_persistent(cfg, ws, name)
    per_split = spans if persist else cdiv(spans, _split_k(cfg, x3.device, spans, grid_m * grid_n * groups))
    split = cdiv(spans, per_split)
    partials = out if split == 1 else torch.empty(split, m, groups, r, dtype=torch.float32, device=x3.device)
    counters = _counters(cfg, x3.device, split, grid_m * grid_n * groups, name, ws)
    s, s_e8m0 = _scale_arg(scale) if scale is not None else (weight, False)
    grid = (_persistent_programs(x3.device, grid_m * grid_n * groups),) if persist else (grid_m, grid_n, groups * split)
    x_arg, x_scales = x3, out  # (out: an unused pointer)
    if x_scale3 is not None:
        x_arg, x_scales = x3.view(torch.uint8), x_scale3.contiguous()
        mode, flat = 3, True
    elif quant_once(True if ws else cfg["QUANT_ONCE"], mode == 1, m, grid_n, name):
        if norm is None:
            x_arg, x_scales = act_quant(x3, span, ue8m0, up3, limit)
        else:  # the norm quantizes its output once (the fuse pass's rms_norm_quant, unfolded)
            codes, x_scales = rms_norm_quant(x3, norm[0], eps=norm[1], group=group,
                                             scale_format="ue8m0" if ue8m0 else "fp32")
            x_arg, norm = codes.view(torch.uint8), None
        mode, flat, up3 = 3, True, None  # every K tile lies in one group, whose scale is looked up
    if ws:
        x_arg = _tma_operands(x_arg, weight, name)
    _gemm_kernel[grid](x_arg, x_arg if up3 is None else up3, weight, s, out, x_scales, partials,
                       out if counters is None else counters, m, r, k, span, per_split, static,
                       0.0 if limit is None else float(limit), bo, bi, *x_arg.stride(), *weight.stride(), s.stride(0),
                       s.stride(-1), *out.stride(), *(partials.stride() if split > 1 else (0, 0, 0, 0)),
                       *_sibling_args(outs, sizes, r), x_arg if norm is None else norm[0],
                       0.0 if norm is None else float(norm[1]), grid_m, grid_n, groups, ACT=mode, ACT_UE8M0=ue8m0,
                       W_SCALED=scale is not None, S_E8M0=s_e8m0, FP8_DOT=fp8_dot, NATIVE=native_cvt(x3.device),
                       FLAT=flat, SPLIT=split, SUM_IN_KERNEL=counters is not None, SEGS=len(outs),
                       SWIGLU=up3 is not None, HAS_LIMIT=limit is not None, NORM=0 if norm is None else next_pow2(k),
                       BM=cfg["BLOCK_M"], BN=cfg["BLOCK_N"], BK=bk, TMA_WS=ws, PERSIST=persist,
                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split > 1 and counters is None:
        if len(outs) == 1:
            torch.sum(partials, 0, out=out)
        else:
            for o, part in zip(outs, torch.sum(partials, 0).split(sizes, -1)):
                o.copy_(part)


def _check_gemm_inputs(x, weight, scale, groups: int, codes: bool = False, name: str = "x") -> None:
    """x (named `name` in the messages): the activations, e4m3 codes with `codes`."""
    check_tensor(name, x, dtypes=(torch.float8_e4m3fn,) if codes else FLOAT_DTYPES, contiguous=False)
    check(x.dim() >= 1, f"{name}: expected at least one dimension")
    if scale is None:
        check_tensor("weight", weight, dtypes=FLOAT_DTYPES, dim=2, contiguous=False)
    else:
        check_tensor("weight", weight, dtypes=(torch.float8_e4m3fn,), dim=2, contiguous=False)
        check_tensor("scale", scale, dtypes=SCALE_DTYPES, contiguous=False)
    same_device(**{name: x}, weight=weight, scale=scale)
    check(weight.shape[1] == x.shape[-1],
          f"weight: shape {list(weight.shape)} does not match {name}'s K = {x.shape[-1]}")
    check(isinstance(groups, int) and groups >= 1 and weight.shape[0] % groups == 0,
          f"groups: {groups!r} must be a positive int dividing weight rows {weight.shape[0]}")


def _check_grouped_x(x, groups: int) -> None:
    check(x.dim() >= 2 and x.shape[-2] == groups,
          f"x: expected shape [..., groups={groups}, K], got {list(x.shape)}")


# --- launchers -----------------------------------------------------------------------------------
def _result(into, shape, groups: int, device):
    """The launcher's fp32 result of `shape` [..., (G,) R] (common.result) and its [M, G, R] view for _gemm."""
    y = result(into, shape, torch.float32, device)
    return y, y.view(math.prod(shape[:-1]) // groups, groups, shape[-1])


def linear(x, weight, *, config=None, into=None):
    """x [..., K] (f32/bf16/f16), weight [N, K] (f32/bf16/f16) -> fp32 [..., N];  y = x W^T."""
    _check_gemm_inputs(x, weight, None, 1)
    lead, k = x.shape[:-1], x.shape[-1]
    y, y3 = _result(into, (*lead, weight.shape[0]), 1, x.device)
    _gemm("linear", x.reshape(-1, 1, k), weight, [y3], config=config)
    return y


def grouped_linear(x, weight, *, groups, config=None, into=None):
    """Block-diagonal projection. x [..., G, K], weight [G*R, K] -> fp32 [..., G, R];
    y[..., g, :] = x[..., g, :] W_g^T with W_g = weight[g*R:(g+1)*R]."""
    _check_gemm_inputs(x, weight, None, groups)
    _check_grouped_x(x, groups)
    lead, k = x.shape[:-2], x.shape[-1]
    y, y3 = _result(into, (*lead, groups, weight.shape[0] // groups), groups, x.device)
    _gemm("grouped_linear", x.reshape(-1, groups, k), weight, [y3], config=config)
    return y


def check_x_scale(x, x_scale, act, act_name: str) -> int:
    """x_scale: the fp32 group scales [..., cdiv(K, group)] of x's e4m3 codes (rms_norm_quant's) over x's leading
    dims, for `act` (the reader's activation quantization, named act_name) in mode dynamic. -> the group count."""
    group = act.get("group") if isinstance(act, dict) and act.get("mode") == "dynamic" else None
    n_groups = cdiv(x.shape[-1], group) if isinstance(group, int) and group >= 1 else None
    check_tensor("x_scale", x_scale, dtypes=(torch.float32,), contiguous=False)
    same_device(x=x, x_scale=x_scale)
    if n_groups is None or tuple(x_scale.shape) != (*x.shape[:-1], n_groups):
        raise ValueError(f"x_scale: expected fp32 {[*x.shape[:-1], n_groups]} (x's rows, one scale per {act_name} "
                         f"group) with {act_name} mode dynamic, got shape {list(x_scale.shape)} and {act_name} {act!r}")
    return n_groups


def linear_fp8(x, weight, scale, x_scale=None, *, block, act, config=None, into=None):
    """x [..., K], weight e4m3 [N, K] with block scales [ceil(N/bo), ceil(K/bi)] (fp32 or UE8M0)
    -> fp32 [..., N] = q(x) dq(W)^T, dq(W)[n, k] = W[n, k] * scale[n // bo, k // bi], q = `act`.
    With x_scale (fp32 [..., ceil(K/group)], act dynamic), x is q(x) already: e4m3 codes, as rms_norm_quant
    writes them; the kernel reads the codes and their scales instead of quantizing x."""
    _check_gemm_inputs(x, weight, scale, 1, codes=x_scale is not None)
    bo_bi = _check_block(block, weight, scale)
    lead, k = x.shape[:-1], x.shape[-1]
    x_scale3 = None
    if x_scale is not None:  # (act itself is checked by _gemm)
        x_scale3 = x_scale.reshape(-1, 1, check_x_scale(x, x_scale, act, "act"))
    y, y3 = _result(into, (*lead, weight.shape[0]), 1, x.device)
    _gemm("linear_fp8", x.reshape(-1, 1, k), weight, [y3], scale, bo_bi, act, config, x_scale3)
    return y


def grouped_linear_fp8(x, weight, scale, *, groups, block, act, config=None, into=None):
    """grouped_linear over q(x) (`act`) and the dequantized e4m3 weight [G*R, K] (block scales as in
    linear_fp8; blocks may straddle groups). x [..., G, K] -> fp32 [..., G, R]."""
    _check_gemm_inputs(x, weight, scale, groups)
    _check_grouped_x(x, groups)
    bo_bi = _check_block(block, weight, scale)
    lead, k = x.shape[:-2], x.shape[-1]
    y, y3 = _result(into, (*lead, groups, weight.shape[0] // groups), groups, x.device)
    _gemm("grouped_linear_fp8", x.reshape(-1, groups, k), weight, [y3], scale, bo_bi, act, config)
    return y


def _check_sizes(sizes, weight, bo: int | None) -> list[int]:
    """sizes: the siblings' output widths, 2 to MAX_SIBLINGS positive ints adding up to the weight's rows; with FP8
    block scales, each but the last a multiple of the block's rows bo (so no scale block spans two siblings)."""
    check(isinstance(sizes, (list, tuple)) and 2 <= len(sizes) <= MAX_SIBLINGS
          and all(isinstance(n, int) and n >= 1 for n in sizes),
          f"sizes: expected 2 to {MAX_SIBLINGS} positive ints (one output width per sibling), got {sizes!r}")
    check(sum(sizes) == weight.shape[0],
          f"sizes: {list(sizes)} add up to {sum(sizes)}, but the weight has {weight.shape[0]} rows")
    check(bo is None or all(n % bo == 0 for n in sizes[:-1]),
          f"sizes: {list(sizes)}: every sibling but the last must have a multiple of the block's {bo} rows, so that "
          f"no scale block spans two siblings")
    return list(sizes)


def _cat_results(into, lead, sizes, device) -> tuple[list, list]:
    """The results of a linear_cat launcher, fp32 [*lead, n] per sibling (common.result), and their [M, 1, n] views."""
    ys = [result(o, (*lead, n), torch.float32, device) for o, n in zip(results(into, len(sizes)), sizes)]
    return ys, [y.view(-1, 1, n) for y, n in zip(ys, sizes)]


def linear_cat(x, weight, *, sizes, config=None, into=None):
    """Sibling projections of one x in one launch: weight [sum(sizes), K] (their weights one after another)
    -> one fp32 [..., n] per n in sizes; result i is x W_i^T, W_i = weight's rows of sibling i."""
    _check_gemm_inputs(x, weight, None, 1)
    sizes = _check_sizes(sizes, weight, None)
    ys, y3s = _cat_results(into, x.shape[:-1], sizes, x.device)
    _gemm("linear_cat", x.reshape(-1, 1, x.shape[-1]), weight, y3s, config=config)
    return tuple(ys)


def linear_fp8_cat(x, weight, scale, x_scale=None, *, sizes, block, act, config=None, into=None):
    """linear_cat over an e4m3 weight with block scales, as linear_fp8 (x_scale: x is e4m3 codes already)."""
    _check_gemm_inputs(x, weight, scale, 1, codes=x_scale is not None)
    bo_bi = _check_block(block, weight, scale)
    sizes = _check_sizes(sizes, weight, bo_bi[0])
    k = x.shape[-1]
    x_scale3 = None if x_scale is None else x_scale.reshape(-1, 1, check_x_scale(x, x_scale, act, "act"))
    ys, y3s = _cat_results(into, x.shape[:-1], sizes, x.device)
    _gemm("linear_fp8_cat", x.reshape(-1, 1, k), weight, y3s, scale, bo_bi, act, config, x_scale3)
    return tuple(ys)


LAUNCHERS = {
    "linear": linear,
    "grouped_linear": grouped_linear,
    "linear_fp8": linear_fp8,
    "grouped_linear_fp8": grouped_linear_fp8,
    "linear_cat": linear_cat,
    "linear_fp8_cat": linear_fp8_cat,
}

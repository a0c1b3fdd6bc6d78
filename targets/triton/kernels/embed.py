"""Embedding-row gathers: plain and FP8 (e4m3, block-scaled) tables. With `hc` (the triton lowering's hc_ends.py:
the embedding feeds the residual streams) each row is stored hc times, [B, S, hc, D], as hc_expand writes it: the
expand's launch is saved."""

import torch
import triton
import triton.language as tl

from .common import cdiv, check, check_tensor, decode_scale, host_values, launch_config, next_pow2, result, same_device
from .gemm import FLOAT_DTYPES, SCALE_DTYPES, _check_block, _scale_arg

TOKEN_DTYPES = (torch.int64, torch.int32)


@triton.jit
def _embed_kernel(tok_ptr, w_ptr, s_ptr, y_ptr, T, V, D, bo, bi, swv, swd, ssv, ssd,
                  SCALED: tl.constexpr, S_E8M0: tl.constexpr, HC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """y[t, j, d] = w[tok[t], d] (* scale[tok[t] // bo, d // bi]) for j < HC (y: [T, HC, D]).
    Grid: (cdiv(T, BT), cdiv(D, BD)). An id outside [0, V) reads no memory: its row is zeros."""
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)  # [BT]
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)  # [BD]
    t_ok, d_ok = offs_t < T, offs_d < D
    mask = t_ok[:, None] & d_ok[None, :]
    tok = tl.load(tok_ptr + offs_t, mask=t_ok, other=0).to(tl.int64)  # [BT]
    mask = mask & ((tok >= 0) & (tok < V))[:, None]
    w = tl.load(w_ptr + tok[:, None] * swv + offs_d[None, :] * swd, mask=mask, other=0.0).to(tl.float32)
    if SCALED:
        sw = tl.load(s_ptr + (tok // bo)[:, None] * ssv + (offs_d // bi)[None, :] * ssd, mask=mask, other=0)
        w = w * decode_scale(sw, S_E8M0)
    out = y_ptr + offs_t[:, None].to(tl.int64) * (HC * D) + offs_d[None, :]
    for j in tl.static_range(HC):
        tl.store(out + j * D, w, mask=mask)


def _embed(name, tokens, weight, scale, block, hc, config, into):
    check_tensor("tokens", tokens, dtypes=TOKEN_DTYPES, contiguous=False)
    check(weight.dim() == 2, f"weight: expected [V, D], got shape {list(weight.shape)}")
    same_device(tokens=tokens, weight=weight, scale=scale)
    (v, d), flat = weight.shape, tokens.reshape(-1).contiguous()
    check(flat.numel() == 0 or not host_values(flat) or (int(flat.min()) >= 0 and int(flat.max()) < v),
          f"tokens: ids must lie in [0, {v}) (the embedding table's rows)")
    cfg = launch_config(config, {"BLOCK_T": min(32, next_pow2(flat.numel())), "BLOCK_D": min(128, next_pow2(d)),
                                 "num_warps": 4}, name)
    check(hc is None or (isinstance(hc, int) and not isinstance(hc, bool) and hc >= 1),
          f"hc: expected a positive int or None, got {hc!r}")
    full = result(into, (*tokens.shape, *([] if hc is None else [hc]), d), torch.float32, weight.device)
    y = full.view(flat.numel(), -1)
    if y.numel():
        s, s_e8m0 = _scale_arg(scale) if scale is not None else (weight, False)
        grid = (cdiv(flat.numel(), cfg["BLOCK_T"]), cdiv(d, cfg["BLOCK_D"]))
        _embed_kernel[grid](flat, weight, s, y, flat.numel(), v, d, block[0], block[1], *weight.stride(),
                            s.stride(0), s.stride(-1), SCALED=scale is not None, S_E8M0=s_e8m0,
                            HC=hc or 1, BT=cfg["BLOCK_T"], BD=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    return full


def embed(tokens, weight, *, hc=None, config=None, into=None):
    """tokens [B, S] int, weight [V, D] (f32/bf16/f16) -> fp32 [B, S, D];  y[b, s] = weight[tokens[b, s]]
    (hc: [B, S, hc, D], the row hc times)."""
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, dim=2, contiguous=False)
    return _embed("embed", tokens, weight, None, (1, 1), hc, config, into)


def embed_fp8(tokens, weight, scale, *, block, hc=None, config=None, into=None):
    """tokens [B, S] int, weight e4m3 [V, D], scale [ceil(V/bo), ceil(D/bi)] (fp32 or UE8M0)
    -> fp32 [B, S, D];  y[b, s, d] = weight[t, d] * scale[t // bo, d // bi], t = tokens[b, s] (hc: as embed's)."""
    check_tensor("weight", weight, dtypes=(torch.float8_e4m3fn,), dim=2, contiguous=False)
    check_tensor("scale", scale, dtypes=SCALE_DTYPES, contiguous=False)
    return _embed("embed_fp8", tokens, weight, scale, _check_block(block, weight, scale), hc, config,
                  into)


LAUNCHERS = {"embed": embed, "embed_fp8": embed_fp8}

"""Storage codecs of the attention keys (= values): f32, bf16, or DeepSeek's fp8_split ([nope e4m3 | rope bf16 |
one UE8M0 scale per 64 nope channels | zero padding to 8 bytes]). `encode_kv` writes new keys as
`quant.encode_entries` does (round to nearest even by integer arithmetic, the UE8M0 exponent exactly:
common.ceil_log2 of the group scale), so a token's key reads the same in prefill and decode; `load_rows` decodes
key tiles in the attention kernel.
"""

import torch
import triton
import triton.language as tl

from .common import (E4M3_MAX, KV_GROUP, bf16_bits, bf16_value, ceil_log2, e4m3_quant, entry_layout, group_scale,
                     next_pow2, pow2, to_bf16, ue8m0_value)

FORMATS = {"f32": 0, "bf16": 1, "fp8_split": 2}


# --- storage codecs (device) -----------------------------------------------------------------
@triton.jit
def load_rows(row_ptr, row_ok, D: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr, FMT: tl.constexpr,
              KDT: tl.constexpr, NATIVE: tl.constexpr, BLOCK_D: tl.constexpr, CACHE: tl.constexpr, D0=0,
              BLOCK_ALL: tl.constexpr = 0):
    """Decode channels [D0, D0 + BLOCK_D) of the storage rows that start at `row_ptr` [BN] (pointers; rows not
    `row_ok` read as 0) into [BN, BLOCK_D] of KDT (fp32, or bf16 for bf16 dots: exact for bf16 and fp8_split
    storage, f32 rounded to nearest even). D0: 0 by default (a constant, whole rows), else a multiple of 64 with
    fp8_split, so a part of a row of BLOCK_ALL channels starts at a scale group.
    fp8_split: channel d < NOPE = e4m3[d] * 2^(scale[d // 64] - 127), channel d >= NOPE =
    the bf16 at bytes NOPE + 2 (d - NOPE), read as one int16 (NOPE even, so aligned) or as two
    bytes (little endian). The scales are read as one 8-byte word per row where the layout allows (else as a
    [BN, groups] tile of bytes) and broadcast over their 64 channels: a per-channel gather of the same bytes
    was a synchronous load in every iteration, which the pipeliner cannot overlap with the dots. CACHE: the loads'
    cache modifier ("" or ".cg": rows that other programs of the launch may have just written)."""
    ptr = row_ptr[:, None]  # [BN, 1]
    d = D0 + tl.arange(0, BLOCK_D)[None, :]
    ok = row_ok[:, None] & (d < D)  # [BN, BD]
    if FMT == 0:
        x = tl.load(ptr + d, mask=ok, other=0.0, cache_modifier=CACHE)
        if KDT == tl.float32:
            return x
        return to_bf16(x, NATIVE)
    elif FMT == 1:
        return tl.load(ptr + d, mask=ok, other=0, cache_modifier=CACHE).to(tl.bfloat16, bitcast=True).to(KDT)
    else:
        BN: tl.constexpr = row_ptr.shape[0]
        WHOLE: tl.constexpr = BLOCK_ALL if BLOCK_ALL > 0 else BLOCK_D
        GW: tl.constexpr = 64 if BLOCK_D > 64 else BLOCK_D  # channels per scale (the format's 64, or the whole tile)
        G: tl.constexpr = BLOCK_D // GW
        is_nope = d < NOPE
        codes = tl.load(ptr + d, mask=ok & is_nope, other=0, cache_modifier=CACHE)
        g = D0 // GW + tl.arange(0, G)[None, :]
        if (NOPE + 2 * ROPE) % 8 == 0 and WHOLE // GW <= 8:  # the scale bytes: one aligned 8-byte word (padding after)
            word = tl.load((row_ptr + NOPE + 2 * ROPE).to(tl.pointer_type(tl.int64)), mask=row_ok, other=0,
                           cache_modifier=CACHE)
            sc = (word[:, None] >> (8 * g).to(tl.int64)) & 0xFF  # [BN, G]
        else:
            sc = tl.load(ptr + NOPE + 2 * ROPE + g, mask=row_ok[:, None] & (g * GW < NOPE), other=0,
                         cache_modifier=CACHE)  # [BN, G]
        scale = tl.reshape(tl.broadcast_to(ue8m0_value(sc)[:, :, None], (BN, G, GW)), (BN, BLOCK_D))
        nope = (codes.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale).to(KDT)  # exact in bf16
        r = d - NOPE  # negative on nope channels, which the mask skips (a plain offset keeps the loads vectorized)
        if NOPE % 2 == 0:
            rope = tl.load((ptr + NOPE).to(tl.pointer_type(tl.int16)) + r, mask=ok & ~is_nope, other=0,
                           cache_modifier=CACHE)
            rope = rope.to(tl.bfloat16, bitcast=True).to(KDT)
        else:
            lo = tl.load(ptr + NOPE + 2 * r, mask=ok & ~is_nope, other=0, cache_modifier=CACHE).to(tl.int32)
            hi = tl.load(ptr + NOPE + 2 * r + 1, mask=ok & ~is_nope, other=0, cache_modifier=CACHE).to(tl.int32)
            rope = bf16_value(lo | (hi << 8)).to(KDT)
        return tl.where(is_nope, nope, rope)


@triton.jit
def encode_row(x_row, out_row, D, NOPE, ROPE, W, FMT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
               BLOCK_R: tl.constexpr, CACHE: tl.constexpr):
    """One storage row: x_row [D] float (read with cache modifier CACHE) -> out_row [W] (f32 / bf16 bits / fp8_split
    bytes, its padding bytes zero). fp8_split per 64-channel nope group:
    e = ceil_log2(max(amax, 1e-4) / 448) (exact), byte e + 127, codes e4m3(clamp(x / 2^e, +-448))."""
    if FMT == 0 or FMT == 1:
        d = tl.arange(0, BLOCK_D)
        x = tl.load(x_row + d, mask=d < D, other=0.0, cache_modifier=CACHE).to(tl.float32)
        if FMT == 0:
            tl.store(out_row + d, x, mask=d < D)
        else:
            tl.store(out_row + d, bf16_bits(x).to(tl.int16), mask=d < D)
    else:
        g = tl.arange(0, BLOCK_G)  # [BG] nope groups
        d = g[:, None] * 64 + tl.arange(0, 64)[None, :]  # [BG, 64]
        x = tl.load(x_row + d, mask=d < NOPE, other=0.0, cache_modifier=CACHE).to(tl.float32)
        e = ceil_log2(group_scale(tl.max(tl.abs(x), axis=1), E4M3_MAX, False))  # [BG] UE8M0 exponents
        tl.store(out_row + d, e4m3_quant(x, pow2(e)[:, None]).to(tl.uint8), mask=d < NOPE)
        tl.store(out_row + NOPE + 2 * ROPE + g, (e + 127).to(tl.uint8), mask=g * 64 < NOPE)
        r = tl.arange(0, BLOCK_R)
        bits = bf16_bits(tl.load(x_row + NOPE + r, mask=r < ROPE, other=0.0, cache_modifier=CACHE).to(tl.float32))
        tl.store(out_row + NOPE + 2 * r, (bits & 0xFF).to(tl.uint8), mask=r < ROPE)
        tl.store(out_row + NOPE + 2 * r + 1, (bits >> 8).to(tl.uint8), mask=r < ROPE)
        pad = NOPE + 2 * ROPE + (NOPE + 63) // 64 + tl.arange(0, 8)  # to a multiple of 8 bytes
        tl.store(out_row + pad, tl.zeros([8], dtype=tl.uint8), mask=pad < W)


@triton.jit
def _encode_kernel(x_ptr, out_ptr, D, NOPE, ROPE, W, FMT: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr):
    """One storage row per program (encode_row): x [R, D] float -> out [R, W]."""
    row = tl.program_id(0).to(tl.int64)
    encode_row(x_ptr + row * D, out_ptr + row * W, D, NOPE, ROPE, W, FMT, BLOCK_D, BLOCK_G, BLOCK_R, "")


# --- host ------------------------------------------------------------------------------------
def encode_kv(x: torch.Tensor, fmt: str, rope: int) -> torch.Tensor:
    """x: [..., d] float -> storage [..., W] in `fmt` (= quant.encode_entries), by `_encode_kernel`."""
    d = x.shape[-1]
    out = storage_for(x, fmt, rope)
    rows = x.reshape(-1, d)
    if rows.shape[0]:
        width = out.shape[-1]
        _encode_kernel[(rows.shape[0],)](rows, storage_view(out), d, d - rope, rope, width, FMT=FORMATS[fmt],
                                         **encode_blocks(d, rope))
    return out


def storage_for(x: torch.Tensor, fmt: str, rope: int) -> torch.Tensor:
    """Uninitialized storage [..., W] for the rows of x [..., d] (encode_row writes every byte)."""
    dtype, width = entry_layout(fmt, x.shape[-1], rope)
    return torch.empty(*x.shape[:-1], width, dtype=dtype, device=x.device)


def encode_blocks(d: int, rope: int) -> dict:
    """encode_row's block sizes for rows of d channels, the last `rope` of them RoPE channels."""
    return {"BLOCK_D": next_pow2(d), "BLOCK_G": next_pow2(-(-(d - rope) // KV_GROUP)), "BLOCK_R": next_pow2(rope)}


def storage_view(t: torch.Tensor) -> torch.Tensor:
    """bf16 storage is read as its int16 bit patterns; other storage as is."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t

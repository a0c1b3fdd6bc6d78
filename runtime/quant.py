"""FP8 e4m3 block-scaled and FP4 e2m1 formats, as DeepSeek ships them.

FP8: weight [O, I] in e4m3 with one scale per (bo x bi) block; scale grid [ceil(O/bo), ceil(I/bi)]
(partial edge blocks allowed); dequant = weight * scale. Scales are fp32, or UE8M0 (a power of
two, stored as float8_e8m0fnu).
FP4: weight [O, I] as int8 [O, I/2], two e2m1 codes per byte (even column in the low nibble;
codes 0..7 = 0, .5, 1, 1.5, 2, 3, 4, 6, bit 3 the sign), one UE8M0 scale per row per 32 inputs.
"""

import torch

E4M3_MAX = 448.0
FP4_MAX = 6.0
FP4_BLOCK = 32
FP4_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def expand_scales(scale: torch.Tensor, shape, block) -> torch.Tensor:
    """scale: [ceil(O/bo), ceil(I/bi)] -> [O, I] (each block's scale over its elements)."""
    (o, i), (bo, bi) = shape, block
    return scale.float().repeat_interleave(bo, 0)[:o].repeat_interleave(bi, 1)[:, :i]


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    return weight.float() * expand_scales(scale, weight.shape, block)


def _block_amax(w: torch.Tensor, block) -> torch.Tensor:
    (o, i), (bo, bi) = w.shape, block
    padded = torch.zeros(cdiv(o, bo) * bo, cdiv(i, bi) * bi, device=w.device)
    padded[:o, :i] = w.abs().float()
    return padded.view(cdiv(o, bo), bo, cdiv(i, bi), bi).amax(dim=(1, 3))


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= x (x > 0, fp32), exactly: frexp gives x = m * 2^e with m in
    [0.5, 1), so the answer is 2^e, or 2^(e-1) when m = 0.5. (`exp2(ceil(log2(x)))` is not exact:
    fp32 log2 rounds values a few ulps above a power of two down onto it, and the scale then
    clips the group's largest value.) Every kernel computes UE8M0 scales this way."""
    x = x.float()
    m, e = torch.frexp(x)
    return torch.where(torch.isfinite(x), torch.ldexp(torch.ones_like(m), e - (m == 0.5).to(e.dtype)), x)


def ue8m0(x: torch.Tensor) -> torch.Tensor:
    """The power of two 2^ceil(log2(x)), as float8_e8m0fnu."""
    return pow2_ceil(x).to(torch.float8_e8m0fnu)


def fp8_scales(w: torch.Tensor, block, scale_format: str = "fp32") -> torch.Tensor:
    """Block scales of `w` [O, I]: amax / 448 per block, fp32 or as UE8M0 powers of two."""
    amax = _block_amax(w, block).clamp(min=1e-4)
    if scale_format == "ue8m0":
        return ue8m0(amax / E4M3_MAX)
    if scale_format == "fp32":
        return amax / E4M3_MAX
    raise ValueError(f"scale_format {scale_format!r}; allowed: fp32, ue8m0")


def quant_fp8(w: torch.Tensor, block, scale_format: str = "fp32"):
    """w: [O, I] float -> (e4m3 weight [O, I], scale [ceil(O/bo), ceil(I/bi)]), fp32 or ue8m0 scales."""
    scale = fp8_scales(w, block, scale_format)
    q = (w.float() / expand_scales(scale, w.shape, block)).clamp(-E4M3_MAX, E4M3_MAX)
    return q.to(torch.float8_e4m3fn), scale


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [O, I/2] -> float32 code values [O, I] (unscaled)."""
    b = packed.view(torch.uint8).long()
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)  # even column = low nibble
    return FP4_VALUES.to(codes.device)[codes]


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    values = unpack_fp4(packed)
    return values * expand_scales(scale, values.shape, (1, FP4_BLOCK))


def fp4_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-row, per-32-input UE8M0 scales of `w` [O, I] for FP4 e2m1."""
    return ue8m0(_block_amax(w, (1, FP4_BLOCK)).clamp(min=1e-4) / FP4_MAX)


def quant_fp4(w: torch.Tensor):
    """w: [O, I] float (I even) -> (int8 [O, I/2], ue8m0 scale [O, ceil(I/32)]); nearest code."""
    o, i = w.shape
    if i % 2:
        raise ValueError(f"FP4 packs two values per byte; input dim {i} is odd")
    scale = fp4_scales(w)
    x = w.float() / expand_scales(scale, w.shape, (1, FP4_BLOCK))
    codes = (x.unsqueeze(-1) - FP4_VALUES.to(x.device)).abs().argmin(dim=-1)  # first (positive-zero) code on ties
    pairs = codes.view(o, i // 2, 2)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8).view(torch.int8)
    return packed, scale


def infer_block(weight_shape, scale_shape, hint=None) -> tuple[int, int]:
    """The block (bo, bi) whose ceil-div grid matches `scale_shape`; `hint` (from the checkpoint's
    quantization config) first, then DeepSeek's 128x128 and 1x32. None if nothing fits."""
    o, i = weight_shape
    candidates = ([tuple(hint)] if hint else []) + [(128, 128), (1, 32), (1, 128)]
    for bo, bi in candidates:
        if (cdiv(o, bo), cdiv(i, bi)) == tuple(scale_shape):
            return bo, bi
    return None


# --- activations -----------------------------------------------------------------------------
def _scale(amax: torch.Tensor, qmax: float, scale_format: str) -> torch.Tensor:
    amax = amax.clamp(min=1e-4)
    return pow2_ceil(amax / qmax) if scale_format == "ue8m0" else amax / qmax


def quant_groups(x: torch.Tensor, group: int, scale_format: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token-group activation quantization: x [..., K] in groups of `group` channels (the
    last one partial) -> (e4m3 codes [..., K], fp32 scales [..., ceil(K/group)]), scale = amax / 448 per
    group (or its UE8M0 power of two)."""
    k = x.shape[-1]
    pad = -k % group
    xp = torch.nn.functional.pad(x.float(), (0, pad)).view(*x.shape[:-1], -1, group)
    s = _scale(xp.abs().amax(dim=-1, keepdim=True), E4M3_MAX, scale_format)
    q = (xp / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(*x.shape[:-1], -1)[..., :k], s.squeeze(-1)


def dequant_groups(codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """quant_groups' codes [..., K] and scales [..., ceil(K/group)] -> fp32 [..., K] (code * its group's scale)."""
    return codes.float() * scales.float().repeat_interleave(group, dim=-1)[..., :codes.shape[-1]]


def fake_quant_groups(x: torch.Tensor, group: int, scale_format: str = "fp32") -> torch.Tensor:
    """quant_groups, dequantized again."""
    return dequant_groups(*quant_groups(x, group, scale_format), group)


def fake_quant_static(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-tensor static activation quantization (scale from calibration), dequantized again."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


def fake_quant_act(x: torch.Tensor, act: dict) -> torch.Tensor:
    """Activation quantization as an op attribute describes it: {"mode": "dynamic", "group", "scale_format"},
    {"mode": "static", "scale"} or {"mode": "none"}."""
    if act["mode"] == "dynamic":
        return fake_quant_groups(x, act["group"], act.get("scale_format", "fp32"))
    if act["mode"] == "static":
        return fake_quant_static(x, act["scale"])
    return x.float()


# --- KV entries ------------------------------------------------------------------------------
# KV entries [..., d] (sliding-window KV, compressed entries, indexer keys); the trailing `rope`
# channels carry RoPE.
#   f32 / bf16:  plain
#   fp8_split:   DeepSeek's attention KV layout, bytes per entry: [nope e4m3 | rope bf16 | one UE8M0
#                scale per 64 nope channels | zero padding to a multiple of 8]  (d 512, rope 64: 584 bytes)
#   fp8_block:   indexer keys: e4m3 with one fp32 scale per 128 values       (d 128: 132 bytes)
#   fp4_block:   indexer keys: e2m1 two per byte, one UE8M0 scale per 32      (d 128: 68 bytes)
KV_GROUP = 64
INDEX_FP8_GROUP = 128
KV_FORMATS = ("f32", "bf16", "fp8_split", "fp8_block", "fp4_block")


def entry_layout(fmt: str, d: int, rope: int) -> tuple[str, int]:
    """-> (storage dtype name, storage elements per entry)."""
    if fmt in ("f32", "bf16"):
        return fmt, d
    if fmt == "fp8_split":
        nope = d - rope
        raw = nope + 2 * rope + cdiv(nope, KV_GROUP)
        return "u8", raw + (-raw % 8)
    if fmt == "fp8_block":
        return "u8", d + 4 * cdiv(d, INDEX_FP8_GROUP)
    if fmt == "fp4_block":
        return "u8", cdiv(d, 2) + cdiv(d, FP4_BLOCK)
    raise ValueError(f"KV format {fmt!r}; allowed: {', '.join(KV_FORMATS)}")


def _encode_fp8_block(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    groups = cdiv(d, INDEX_FP8_GROUP)
    xg = torch.nn.functional.pad(x.float(), (0, groups * INDEX_FP8_GROUP - d)).view(*x.shape[:-1], groups, -1)
    scale = xg.abs().amax(dim=-1, keepdim=True).clamp(min=1e-4) / E4M3_MAX
    q = (xg / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(*x.shape[:-1], -1)[..., :d]
    return torch.cat([q.view(torch.uint8), scale.squeeze(-1).contiguous().view(torch.uint8)], dim=-1)


def _decode_fp8_block(s: torch.Tensor, d: int) -> torch.Tensor:
    scale = s[..., d:].contiguous().view(torch.float32)
    q = s[..., :d].contiguous().view(torch.float8_e4m3fn).float()
    return q * scale.repeat_interleave(INDEX_FP8_GROUP, dim=-1)[..., :d]


def _encode_fp4_block(x: torch.Tensor) -> torch.Tensor:
    shape, d = x.shape[:-1], x.shape[-1]
    flat = torch.nn.functional.pad(x.float().reshape(-1, d), (0, d % 2))
    q, scale = quant_fp4(flat)
    return torch.cat([q.view(torch.uint8), scale.view(torch.uint8)], dim=-1).view(*shape, -1)


def _decode_fp4_block(s: torch.Tensor, d: int) -> torch.Tensor:
    half = cdiv(d, 2)
    shape = s.shape[:-1]
    flat = s.reshape(-1, s.shape[-1])
    out = dequant_fp4(flat[:, :half].contiguous().view(torch.int8), flat[:, half:].contiguous().view(torch.float8_e8m0fnu))
    return out[:, :d].reshape(*shape, d)


def encode_entries(x: torch.Tensor, fmt: str, rope: int) -> torch.Tensor:
    """x: [..., d] float -> storage for `fmt` ([..., d] f32 / bf16, or [..., bytes] uint8)."""
    if fmt == "f32":
        return x.float()
    if fmt == "bf16":
        return x.to(torch.bfloat16)
    if fmt == "fp8_block":
        return _encode_fp8_block(x)
    if fmt == "fp4_block":
        return _encode_fp4_block(x)
    d = x.shape[-1]
    nope = d - rope
    groups = cdiv(nope, KV_GROUP)
    xn = torch.nn.functional.pad(x[..., :nope].float(), (0, groups * KV_GROUP - nope)).view(*x.shape[:-1], groups, KV_GROUP)
    scale = ue8m0(xn.abs().amax(dim=-1, keepdim=True).clamp(min=1e-4) / E4M3_MAX)
    q = (xn / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(*x.shape[:-1], -1)[..., :nope]
    _, size = entry_layout(fmt, d, rope)
    out = torch.zeros(*x.shape[:-1], size, dtype=torch.uint8, device=x.device)
    out[..., :nope] = q.view(torch.uint8)
    out[..., nope:nope + 2 * rope] = x[..., nope:].to(torch.bfloat16).contiguous().view(torch.uint8)
    out[..., nope + 2 * rope:nope + 2 * rope + groups] = scale.squeeze(-1).view(torch.uint8)
    return out


def decode_entries(s: torch.Tensor, fmt: str, d: int, rope: int) -> torch.Tensor:
    """Storage -> f32 entries [..., d]."""
    if fmt in ("f32", "bf16"):
        return s.float()
    if fmt == "fp8_block":
        return _decode_fp8_block(s, d)
    if fmt == "fp4_block":
        return _decode_fp4_block(s, d)
    nope = d - rope
    groups = cdiv(nope, KV_GROUP)
    q = s[..., :nope].contiguous().view(torch.float8_e4m3fn).float()
    r = s[..., nope:nope + 2 * rope].contiguous().view(torch.bfloat16).float()
    scale = s[..., nope + 2 * rope:nope + 2 * rope + groups].contiguous().view(torch.float8_e8m0fnu).float()
    return torch.cat([q * scale.repeat_interleave(KV_GROUP, dim=-1)[..., :nope], r], dim=-1)

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
    padded = torch.zeros(cdiv(o, bo) * bo, cdiv(i, bi) * bi)
    padded[:o, :i] = w.abs().float()
    return padded.view(cdiv(o, bo), bo, cdiv(i, bi), bi).amax(dim=(1, 3))


def ue8m0(x: torch.Tensor) -> torch.Tensor:
    """The power of two 2^ceil(log2(x)), as float8_e8m0fnu."""
    return torch.exp2(torch.ceil(torch.log2(x))).to(torch.float8_e8m0fnu)


def quant_fp8(w: torch.Tensor, block, scale_format: str = "fp32"):
    """w: [O, I] float -> (e4m3 weight [O, I], scale [ceil(O/bo), ceil(I/bi)]), fp32 or ue8m0 scales."""
    amax = _block_amax(w, block).clamp(min=1e-4)
    if scale_format == "ue8m0":
        scale = ue8m0(amax / E4M3_MAX)
    elif scale_format == "fp32":
        scale = amax / E4M3_MAX
    else:
        raise ValueError(f"scale_format {scale_format!r}; allowed: fp32, ue8m0")
    q = (w.float() / expand_scales(scale, w.shape, block)).clamp(-E4M3_MAX, E4M3_MAX)
    return q.to(torch.float8_e4m3fn), scale


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [O, I/2] -> float32 code values [O, I] (unscaled)."""
    b = packed.view(torch.uint8).long()
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)  # even column = low nibble
    return FP4_VALUES[codes]


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    values = unpack_fp4(packed)
    return values * expand_scales(scale, values.shape, (1, FP4_BLOCK))


def quant_fp4(w: torch.Tensor):
    """w: [O, I] float (I even) -> (int8 [O, I/2], ue8m0 scale [O, ceil(I/32)]); nearest code."""
    o, i = w.shape
    if i % 2:
        raise ValueError(f"FP4 packs two values per byte; input dim {i} is odd")
    scale = ue8m0(_block_amax(w, (1, FP4_BLOCK)).clamp(min=1e-4) / FP4_MAX)
    x = w.float() / expand_scales(scale, w.shape, (1, FP4_BLOCK))
    codes = (x.unsqueeze(-1) - FP4_VALUES).abs().argmin(dim=-1)  # first (positive-zero) code on ties
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

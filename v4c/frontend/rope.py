"""RoPE inverse frequencies for the two V4 families, computed at compile time and stored in the
module as parameters (`rope.main.inv_freq`, `rope.compress.inv_freq`), so the runtime only
applies them. Plain RoPE: inv_freq_i = theta^(-2i/R). YaRN blends interpolated and extrapolated
frequencies with a linear ramp between the correction dims (as transformers computes it).
"""

import math

import torch

from v4c.runtime.config import RopeConfig


def _yarn(theta: float, dim: int, yarn: dict, max_positions: int) -> tuple[torch.Tensor, float]:
    factor = yarn.get("factor") or max_positions / yarn["original_max_position_embeddings"]
    original = yarn["original_max_position_embeddings"]
    beta_fast, beta_slow = yarn.get("beta_fast") or 32, yarn.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of the extrapolated (unscaled) frequency
    inv_freq = interpolation * (1 - keep) + extrapolation * keep

    scale = yarn.get("attention_factor")
    if scale is None:
        def mscale(s, m=1.0):
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
        m, m_all = yarn.get("mscale"), yarn.get("mscale_all_dim")
        scale = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return inv_freq, float(scale)


def inv_freq(rope: RopeConfig, dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    """-> (inv_freq [dim/2] fp32, cos/sin scale) for `dim` rotated channels."""
    if rope.yarn:
        return _yarn(float(rope.theta), dim, rope.yarn, max_positions)
    return 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

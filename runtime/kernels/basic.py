"""Plain-PyTorch fp32 kernels for the dense ops: embedding, projections, norms, RoPE, SwiGLU.

These are the reference semantics of the IR ops of the same name. Inputs may be bf16 / f16 /
f32; every kernel computes in fp32 and returns fp32.
"""

import torch
import torch.nn.functional as F


def embed(tokens, weight, *, hc=None):
    """tokens: [B, S] int, weight: [V, D] -> [B, S, D]; with hc (the triton target's embed of the residual
    streams) -> [B, S, hc, D], the row hc times as hc_expand writes it."""
    return expand_rows(F.embedding(tokens, weight).float(), hc)


def expand_rows(y, hc):
    """y [..., D] as is (hc None), else [..., hc, D]: the same row hc times."""
    return y if hc is None else y.unsqueeze(-2).expand(*y.shape[:-1], hc, y.shape[-1]).contiguous()


def linear(x, weight):
    """x: [..., K], weight: [N, K] -> [..., N];  y = x W^T"""
    return F.linear(x.float(), weight.float())


def linear_cat(x, weight, *, sizes):
    """Sibling projections of one x (the triton target joins them, one launch): x W^T over their weights
    [sum(sizes), K] one after another, split into one [..., n] per n in sizes."""
    return tuple(y.contiguous() for y in linear(x, weight).split(sizes, -1))


def grouped_linear(x, weight, *, groups):
    """Block-diagonal projection. x: [B, S, G, K], weight: [G*R, K] -> [B, S, G, R];
    y[..., g, :] = x[..., g, :] W_g^T with W_g = weight[g*R:(g+1)*R]."""
    lead, k = x.shape[:-2], x.shape[-1]
    w = weight.float().view(groups, -1, k).transpose(1, 2)  # [G, K, R]
    xg = x.float().reshape(-1, groups, k).transpose(0, 1)  # [G, N, K]
    return torch.bmm(xg, w).transpose(0, 1).reshape(*lead, groups, -1)


def rms_norm(x, weight=None, *, eps):
    """y = x / sqrt(mean(x^2) + eps) [* weight], over the last dim."""
    x = x.float()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else weight.float() * y


def rope_cos_sin(positions, inv_freq, scale=1.0):
    """positions: [S] int, inv_freq: [R/2] -> cos, sin: [S, R/2] (fp32)."""
    freqs = positions[:, None].float() * inv_freq.float()
    return freqs.cos() * scale, freqs.sin() * scale


def apply_rope(x, cos, sin):
    """Interleaved RoPE on the trailing R channels of x: [B, S, ..., D]; cos/sin: [S, R/2].
    Pairs (x[2i], x[2i+1]) rotate by angle i: (a, b) -> (a cos - b sin, b cos + a sin)."""
    half = cos.shape[-1]
    view = (1, cos.shape[0]) + (1,) * (x.dim() - 3) + (2 * half,)
    cos = cos.repeat_interleave(2, dim=-1).view(view)
    sin = sin.repeat_interleave(2, dim=-1).view(view)
    x = x.float()
    nope, rot = x[..., : -2 * half], x[..., -2 * half:]
    swapped = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
    return torch.cat([nope, rot * cos + swapped * sin], dim=-1)


def rope(x, positions, inv_freq, *, inverse=False, scale=1.0):
    """x: [B, S, ..., D], positions: [S]. `inverse` rotates by -angle (undoes RoPE on an output)."""
    cos, sin = rope_cos_sin(positions, inv_freq, scale)
    return apply_rope(x, cos, -sin if inverse else sin)


def rms_norm_rope(x, positions, inv_freq, weight=None, *, eps, inverse=False, scale=1.0):
    """rope(rms_norm(x, weight, eps), positions, inv_freq): the fuse pass's one kernel for a norm read only by RoPE."""
    return rope(rms_norm(x, weight, eps=eps), positions, inv_freq, inverse=inverse, scale=scale)


def reshape(x, *, shape):
    """Keep the leading symbolic dims of `shape` (e.g. "B", "S") and reshape the rest."""
    n_sym = next((i for i, d in enumerate(shape) if not isinstance(d, str)), len(shape))
    return x.reshape(*x.shape[:n_sym], *shape[n_sym:])


def add(a, b):
    return a.float() + b.float()


def swiglu(gate, up, *, limit=None):
    """silu(min(gate, limit)) * clamp(up, -limit, limit); no clamp when limit is None."""
    gate, up = gate.float(), up.float()
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up

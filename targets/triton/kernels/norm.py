"""Triton kernels for the dense elementwise / row ops: RMSNorm (plain, fused with per-token-group FP8
activation quantization, or fused with the RoPE that follows it), SwiGLU, add and RoPE.

Every launcher has the signature and semantics of the runtime torch kernel of the same name
(runtime/kernels/basic.py; rms_norm_quant = runtime.quant.fake_quant_groups over rms_norm) plus an
optional `config` dict. Inputs may be f32 / bf16 / f16 of any layout (non-contiguous inputs are
copied to contiguous ones first); all math is fp32 and outputs are fp32 (q codes: float8_e4m3fn).

Float8 codes are rounded in integer arithmetic (common.e4m3_quant), not with `.to(tl.float8e4nv)`: the
Triton 3.9 interpreter's float downcast is not round-to-nearest-even, while this is bit-exact with
torch's `.to(torch.float8_e4m3fn)` both in the interpreter and on a GPU. Group scales are computed as the
reference does (common.group_scale: a correctly rounded division, UE8M0 as an exact power of two).
"""

import torch
import triton
import triton.language as tl

from .common import (E4M3_MAX, cdiv, check, check_tensor, e4m3_quant, group_scale, launch_config, next_pow2,
                     result, results, same_device, swiglu_value)

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
INTS = (torch.int32, torch.int64)
MAX_ROW = 1 << 16  # the row kernels hold one padded row in a block


# --- device helpers ----------------------------------------------------------------------------
@triton.jit
def row_rstd(x_row, K, eps, BLOCK_K: tl.constexpr, CACHE: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of one row x_row[0:K], fp32."""
    k = tl.arange(0, BLOCK_K)
    x = tl.load(x_row + k, mask=k < K, other=0.0, cache_modifier=CACHE).to(tl.float32)
    return tl.math.rsqrt(tl.sum(x * x, axis=0) / K + eps)


@triton.jit
def norm_quant_row(x_row, w_ptr, q_row, s_row, y_row, K, NG, eps, GROUP: tl.constexpr, UE8M0: tl.constexpr,
                   HAS_W: tl.constexpr, HAS_Y: tl.constexpr, CACHE: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_NG: tl.constexpr, BLOCK_G: tl.constexpr):
    """One row x_row[0:K], viewed as a [NG, GROUP] tile (last group partial): y = rms_norm(x); s_g = max(amax_g,
    1e-4) / 448 (or its pow2_ceil for UE8M0); q = e4m3(clamp(y / s_g, +-448)) to q_row (bytes), s to s_row;
    HAS_Y: y is stored to y_row too (as _rms_norm_kernel computes it). CACHE: the loads' cache modifier (".cg"
    where other threads of the program just stored the row: hyper.py's collapse)."""
    rstd = row_rstd(x_row, K, eps, BLOCK_K, CACHE)
    g = tl.arange(0, BLOCK_NG)[:, None]
    i = tl.arange(0, BLOCK_G)[None, :]
    k = g * GROUP + i  # [BLOCK_NG, BLOCK_G] channel index
    mask = (i < GROUP) & (k < K)
    y = tl.load(x_row + k, mask=mask, other=0.0, cache_modifier=CACHE).to(tl.float32) * rstd
    if HAS_W:
        y = tl.load(w_ptr + k, mask=mask, other=0.0).to(tl.float32) * y
    s = group_scale(tl.max(tl.abs(y), axis=1), E4M3_MAX, UE8M0)  # [BLOCK_NG]
    q = e4m3_quant(y, s[:, None])
    tl.store(q_row + k, q.to(tl.uint8), mask=mask)
    tl.store(s_row + g, s[:, None], mask=g < NG)
    if HAS_Y:
        tl.store(y_row + k, y, mask=mask)


# --- kernels ------------------------------------------------------------------------------------
@triton.jit
def norm_row(x_row, w_ptr, y_row, K, eps, HAS_W: tl.constexpr, CACHE: tl.constexpr, BLOCK_K: tl.constexpr):
    """One row: y = x * rstd [* w] (CACHE: as norm_quant_row's)."""
    rstd = row_rstd(x_row, K, eps, BLOCK_K, CACHE)
    k = tl.arange(0, BLOCK_K)
    mask = k < K
    y = tl.load(x_row + k, mask=mask, other=0.0, cache_modifier=CACHE).to(tl.float32) * rstd
    if HAS_W:
        y = tl.load(w_ptr + k, mask=mask, other=0.0).to(tl.float32) * y
    tl.store(y_row + k, y, mask=mask)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, K, eps, HAS_W: tl.constexpr, BLOCK_K: tl.constexpr):
    """One row per program: norm_row."""
    row = tl.program_id(0).to(tl.int64)
    norm_row(x_ptr + row * K, w_ptr, y_ptr + row * K, K, eps, HAS_W, "", BLOCK_K)


@triton.jit
def _rms_norm_quant_kernel(x_ptr, w_ptr, q_ptr, s_ptr, y_ptr, K, NG, eps, GROUP: tl.constexpr, UE8M0: tl.constexpr,
                           HAS_W: tl.constexpr, HAS_Y: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_NG: tl.constexpr,
                           BLOCK_G: tl.constexpr):
    """One row per program (norm_quant_row)."""
    row = tl.program_id(0).to(tl.int64)
    norm_quant_row(x_ptr + row * K, w_ptr, q_ptr + row * K, s_ptr + row * NG, y_ptr + row * K, K, NG, eps, GROUP,
                   UE8M0, HAS_W, HAS_Y, "", BLOCK_K, BLOCK_NG, BLOCK_G)


@triton.jit
def _swiglu_kernel(g_ptr, u_ptr, y_ptr, n, limit, HAS_LIMIT: tl.constexpr, BLOCK: tl.constexpr):
    """y = silu(min(g, limit)) * clamp(u, -limit, limit); silu(g) = g / (1 + exp(-g))."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, swiglu_value(g, u, limit, HAS_LIMIT), mask=mask)


@triton.jit
def _add_kernel(a_ptr, b_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, a + b, mask=mask)


@triton.jit
def rotate(a, b, pos, inv_ptr, i, HALF, scale, INVERSE: tl.constexpr):
    """Pairs (a, b) at channels (NOPE + 2i, NOPE + 2i + 1) rotated by angle pos * inv[i]: (a cos - b sin,
    b cos + a sin), cos and sin scaled by `scale`, sin negated if INVERSE."""
    angle = pos * tl.load(inv_ptr + i, mask=i < HALF, other=0.0)
    cos = tl.cos(angle) * scale
    sin = tl.sin(angle) * scale
    if INVERSE:
        sin = -sin
    return a * cos - b * sin, b * cos + a * sin


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, inv_ptr, y_ptr, rows, S, H, scale, D: tl.constexpr, NOPE: tl.constexpr,
                 HALF: tl.constexpr, INVERSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_NOPE: tl.constexpr,
                 BLOCK_HALF: tl.constexpr):
    """BLOCK_M rows of x viewed as [B*S*H, D]; row r has position pos[(r // H) % S] (rope_rows)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < rows
    rope_rows(x_ptr, y_ptr, r, rmask, tl.load(pos_ptr + (r // H) % S, mask=rmask, other=0), inv_ptr, scale, D, NOPE,
              HALF, INVERSE, BLOCK_NOPE, BLOCK_HALF)


@triton.jit
def rope_rows(x_ptr, y_ptr, r, rmask, pos, inv_ptr, scale, D, NOPE, HALF, INVERSE: tl.constexpr,
              BLOCK_NOPE: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rows r [R] (int64; those not rmask untouched) of x [.., D] to y at positions pos [R]: channels [0, NOPE)
    copied as fp32, the pairs after them rotated (rotate)."""
    base = r[:, None] * D
    c = tl.arange(0, BLOCK_NOPE)[None, :]
    nmask = rmask[:, None] & (c < NOPE)
    tl.store(y_ptr + base + c, tl.load(x_ptr + base + c, mask=nmask, other=0.0).to(tl.float32), mask=nmask)

    i = tl.arange(0, BLOCK_HALF)[None, :]
    pmask = rmask[:, None] & (i < HALF)
    even = base + NOPE + 2 * i
    a = tl.load(x_ptr + even, mask=pmask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + even + 1, mask=pmask, other=0.0).to(tl.float32)
    a, b = rotate(a, b, pos.to(tl.float32)[:, None], inv_ptr, i, HALF, scale, INVERSE)
    tl.store(y_ptr + even, a, mask=pmask)
    tl.store(y_ptr + even + 1, b, mask=pmask)


@triton.jit
def norm_rope_row(x_row, w_ptr, y_row, pos, inv_ptr, scale, eps, D, NOPE, HALF, INVERSE: tl.constexpr,
                  HAS_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_NOPE: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One row x_row[0:D] to y_row: y = x * rstd [* w] as _rms_norm_kernel computes it (the same row sum, so the same
    bits), then the trailing pairs rotated at position pos as _rope_kernel does."""
    rstd = row_rstd(x_row, D, eps, BLOCK_D, "")
    c = tl.arange(0, BLOCK_NOPE)
    nope = tl.load(x_row + c, mask=c < NOPE, other=0.0).to(tl.float32) * rstd
    i = tl.arange(0, BLOCK_HALF)
    a = tl.load(x_row + NOPE + 2 * i, mask=i < HALF, other=0.0).to(tl.float32) * rstd
    b = tl.load(x_row + NOPE + 2 * i + 1, mask=i < HALF, other=0.0).to(tl.float32) * rstd
    if HAS_W:
        nope = tl.load(w_ptr + c, mask=c < NOPE, other=0.0).to(tl.float32) * nope
        a = tl.load(w_ptr + NOPE + 2 * i, mask=i < HALF, other=0.0).to(tl.float32) * a
        b = tl.load(w_ptr + NOPE + 2 * i + 1, mask=i < HALF, other=0.0).to(tl.float32) * b
    tl.store(y_row + c, nope, mask=c < NOPE)
    a, b = rotate(a, b, pos.to(tl.float32), inv_ptr, i, HALF, scale, INVERSE)
    tl.store(y_row + NOPE + 2 * i, a, mask=i < HALF)
    tl.store(y_row + NOPE + 2 * i + 1, b, mask=i < HALF)


@triton.jit
def _rms_norm_rope_kernel(x_ptr, pos_ptr, inv_ptr, w_ptr, y_ptr, S, H, scale, eps, D: tl.constexpr,
                          NOPE: tl.constexpr, HALF: tl.constexpr, INVERSE: tl.constexpr, HAS_W: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_NOPE: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One row of x viewed as [B*S*H, D] per program (position pos[(row // H) % S]): norm_rope_row."""
    row = tl.program_id(0).to(tl.int64)
    norm_rope_row(x_ptr + row * D, w_ptr, y_ptr + row * D, tl.load(pos_ptr + (row // H) % S), inv_ptr, scale, eps, D,
                  NOPE, HALF, INVERSE, HAS_W, BLOCK_D, BLOCK_NOPE, BLOCK_HALF)


# --- host side ----------------------------------------------------------------------------------
def _float_input(name: str, t) -> torch.Tensor:
    check_tensor(name, t, dtypes=FLOATS, contiguous=False)
    return t.contiguous()


def _row_size(name: str, k: int) -> int:
    check(k >= 1, f"{name}: the last dimension must be non-empty")
    check(next_pow2(k) <= MAX_ROW, f"{name}: rows of {k} channels are not supported (at most {MAX_ROW})")
    return next_pow2(k)


def quant_tiles(name: str, k: int, group) -> tuple[int, int, int]:
    """norm_quant_row's tiles for rows of k channels (named `name`) in activation groups of `group`: (BLOCK_K,
    BLOCK_NG, BLOCK_G), checking both."""
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"group: expected a positive int, got {group!r}")
    block_k = _row_size(name, k)
    block_g, block_ng = next_pow2(min(group, k)), next_pow2(-(-k // group))
    if block_g * block_ng > 2 * MAX_ROW:
        raise ValueError(f"group: {group} does not tile rows of {k} channels")
    return block_k, block_ng, block_g


def _weight(weight, k: int):
    if weight is None:
        return None
    check_tensor("weight", weight, dtypes=FLOATS, dim=1, contiguous=False)
    check(weight.shape[0] == k, f"weight: expected shape [{k}], got {list(weight.shape)}")
    return weight.contiguous()


def rms_norm(x, weight=None, *, eps, config=None, into=None):
    """x: [..., K] -> fp32 [..., K];  y = x / sqrt(mean(x^2) + eps) [* weight]."""
    cfg = launch_config(config, {"num_warps": 4}, "rms_norm")
    x = _float_input("x", x)
    k = x.shape[-1] if x.dim() else 0
    block_k = _row_size("x", k)
    w = _weight(weight, k)
    same_device(x=x, weight=w)
    y = result(into, x.shape, torch.float32, x.device)
    rows = x.numel() // k
    if rows:
        _rms_norm_kernel[(rows,)](x, x if w is None else w, y, k, float(eps), HAS_W=w is not None,
                                  BLOCK_K=block_k, num_warps=cfg["num_warps"])
    return y


def rms_norm_quant(x, weight=None, *, eps, group, scale_format="fp32", keep=False, config=None, into=None):
    """RMSNorm fused with dynamic per-token-group FP8 quantization.
    x: [..., K] -> (q float8_e4m3fn [..., K], scales fp32 [..., ceil(K/group)]) with
    q.float() * scales (each over its group) == fake_quant_groups(rms_norm(x, weight, eps), group, scale_format);
    keep: also the norm's fp32 output y [..., K] (third), for readers that take it unquantized."""
    cfg = launch_config(config, {"num_warps": 4}, "rms_norm_quant")
    if scale_format not in ("fp32", "ue8m0"):  # (messages built only on failure: a decode step makes ~30 calls)
        raise ValueError(f"scale_format {scale_format!r} is not supported; expected fp32 or ue8m0")
    x = _float_input("x", x)
    k = x.shape[-1] if x.dim() else 0
    block_k, block_ng, block_g = quant_tiles("x", k, group)
    w = _weight(weight, k)
    same_device(x=x, weight=w)
    n_groups = -(-k // group)
    into_q, into_s, *into_y = results(into, 3 if keep else 2)
    q = result(into_q, x.shape, torch.float8_e4m3fn, x.device)
    scales = result(into_s, (*x.shape[:-1], n_groups), torch.float32, x.device)
    y = result(into_y[0], x.shape, torch.float32, x.device) if keep else scales  # (scales: an unused pointer)
    rows = x.numel() // k
    if rows:
        _rms_norm_quant_kernel[(rows,)](x, x if w is None else w, q.view(torch.uint8), scales, y, k, n_groups,
                                        float(eps), GROUP=group, UE8M0=scale_format == "ue8m0",
                                        HAS_W=w is not None, HAS_Y=bool(keep), BLOCK_K=block_k, BLOCK_NG=block_ng,
                                        BLOCK_G=block_g, num_warps=cfg["num_warps"])
    return (q, scales, y) if keep else (q, scales)


def swiglu(gate, up, *, limit=None, config=None, into=None):
    """gate, up: same shape -> fp32;  silu(min(gate, limit)) * clamp(up, -limit, limit) (no clamp if limit is None)."""
    cfg = launch_config(config, {"block": 1024, "num_warps": 4}, "swiglu")
    gate, up = _float_input("gate", gate), _float_input("up", up)
    check(gate.shape == up.shape, f"gate, up: shapes {list(gate.shape)} and {list(up.shape)} differ (no broadcasting)")
    same_device(gate=gate, up=up)
    y = result(into, gate.shape, torch.float32, gate.device)
    n, block = gate.numel(), cfg["block"]
    if n:
        _swiglu_kernel[(cdiv(n, block),)](gate, up, y, n, 0.0 if limit is None else float(limit),
                                                 HAS_LIMIT=limit is not None, BLOCK=block, num_warps=cfg["num_warps"])
    return y


def add(a, b, *, config=None, into=None):
    """a + b in fp32 -> fp32. Broadcast shapes are materialized on the host first."""
    cfg = launch_config(config, {"block": 1024, "num_warps": 4}, "add")
    check_tensor("a", a, dtypes=FLOATS, contiguous=False)
    check_tensor("b", b, dtypes=FLOATS, contiguous=False)
    same_device(a=a, b=b)
    try:
        a, b = torch.broadcast_tensors(a, b)
    except RuntimeError:
        raise ValueError(f"a, b: shapes {list(a.shape)} and {list(b.shape)} do not broadcast") from None
    a, b = a.contiguous(), b.contiguous()
    y = result(into, a.shape, torch.float32, a.device)
    n, block = a.numel(), cfg["block"]
    if n:
        _add_kernel[(cdiv(n, block),)](a, b, y, n, BLOCK=block, num_warps=cfg["num_warps"])
    return y


def rope(x, positions, inv_freq, *, inverse=False, scale=1.0, config=None, into=None):
    """x: [B, S, ..., D], positions: [S] int, inv_freq: [R/2] -> fp32 [B, S, ..., D]: interleaved RoPE on
    the trailing R channels at angle positions[s] * inv_freq[i]; `inverse` rotates by -angle."""
    cfg = launch_config(config, {"block_m": 16, "num_warps": 4}, "rope")
    x, positions, inv_freq, rows, seq, heads, d, half = _rope_inputs(x, positions, inv_freq)
    y = result(into, x.shape, torch.float32, x.device)
    if rows:
        block_m = cfg["block_m"]
        _rope_kernel[(cdiv(rows, block_m),)](
            x, positions, inv_freq, y, rows, seq, heads, float(scale), D=d, NOPE=d - 2 * half, HALF=half,
            INVERSE=bool(inverse), BLOCK_M=block_m, BLOCK_NOPE=next_pow2(d - 2 * half), BLOCK_HALF=next_pow2(half),
            num_warps=cfg["num_warps"])
    return y


def rms_norm_rope(x, positions, inv_freq, weight=None, *, eps, inverse=False, scale=1.0, config=None, into=None):
    """rope(rms_norm(x, weight, eps), positions, inv_freq) in one kernel (the fuse pass's norm_rope), bit for bit
    the two launches' result: each row of the last dim normalized, then its trailing R channels rotated;
    x: [B, S, ..., D] -> fp32."""
    cfg = launch_config(config, {"num_warps": 4}, "rms_norm_rope")
    x, positions, inv_freq, rows, seq, heads, d, half = _rope_inputs(x, positions, inv_freq)
    block_d = _row_size("x", d)
    w = _weight(weight, d)
    same_device(x=x, weight=w)
    y = result(into, x.shape, torch.float32, x.device)
    if rows:
        _rms_norm_rope_kernel[(rows,)](
            x, positions, inv_freq, x if w is None else w, y, seq, heads, float(scale), float(eps), D=d,
            NOPE=d - 2 * half, HALF=half, INVERSE=bool(inverse), HAS_W=w is not None, BLOCK_D=block_d,
            BLOCK_NOPE=next_pow2(d - 2 * half), BLOCK_HALF=next_pow2(half), num_warps=cfg["num_warps"])
    return y


def rope_operands(name: str, x, positions, inv_freq, attrs) -> tuple:
    """A fused op's RoPE of x [B, S, .., D] (`name`: its attribute holding the rope's {inverse?, scale?}), checked ->
    (positions, inv_freq as fp32, inverse, scale), for the kernels' rope_rows / rotate."""
    check(isinstance(attrs, dict) and set(attrs) <= {"inverse", "scale"},
          f"{name}: expected the rope's attributes {{inverse?, scale?}}, got {attrs!r}")
    check_tensor("positions", positions, dtypes=INTS, dim=1, contiguous=False)
    check_tensor("inv_freq", inv_freq, dtypes=FLOATS, dim=1, contiguous=False)
    check(x.dim() >= 3 and positions.shape[0] == x.shape[1],
          f"positions: expected [{x.shape[1] if x.dim() >= 3 else 'S'}] (one per token), got {list(positions.shape)}")
    check(inv_freq.shape[0] >= 1 and 2 * inv_freq.shape[0] <= x.shape[-1],
          f"inv_freq: {inv_freq.shape[0]} pairs do not fit {x.shape[-1]} channels")
    same_device(x=x, positions=positions, inv_freq=inv_freq)
    return positions.contiguous(), inv_freq.float().contiguous(), attrs.get("inverse", False), attrs.get("scale", 1.0)


def _rope_inputs(x, positions, inv_freq):
    """-> x, positions, inv_freq (contiguous, inv_freq fp32), rows, S, heads per (b, s), D, R/2."""
    x = _float_input("x", x)
    check(x.dim() >= 3, f"x: expected [B, S, ..., D] (3+ dimensions), got shape {list(x.shape)}")
    check_tensor("positions", positions, dtypes=INTS, dim=1, contiguous=False)
    check_tensor("inv_freq", inv_freq, dtypes=FLOATS, dim=1, contiguous=False)
    batch, seq, d = x.shape[0], x.shape[1], x.shape[-1]
    half = inv_freq.shape[0]
    check(positions.shape[0] == seq, f"positions: expected shape [{seq}] (x's S), got {list(positions.shape)}")
    check(half >= 1, "inv_freq: must be non-empty (the reference's rope needs at least one frequency)")
    check(2 * half <= d, f"inv_freq: {half} frequencies rotate {2 * half} channels, more than x's {d}")
    same_device(x=x, positions=positions, inv_freq=inv_freq)
    rows = x.numel() // d if d else 0
    heads = rows // (batch * seq) if rows else 0
    return x, positions.contiguous(), inv_freq.float().contiguous(), rows, seq, heads, d, half


LAUNCHERS = {"rms_norm": rms_norm, "rms_norm_quant": rms_norm_quant, "swiglu": swiglu, "add": add, "rope": rope,
             "rms_norm_rope": rms_norm_rope}

"""Finishing the attention kernel's rows (kernels/attention.py): merging the runs of a split, the output RoPE of a
finished row, and the ring update at a device position."""

import triton
import triton.language as tl

from .norm import rotate


@triton.jit
def _rope_rows(rows, ok, pos, inv_ptr, rope_scale, R_NOPE, HALF: tl.constexpr, INVERSE: tl.constexpr,
               BLOCK_HALF: tl.constexpr):
    """RoPE on output rows `rows` [R] (pointers; those not `ok` untouched) just stored by other threads of the
    program: after a barrier, the pairs (R_NOPE + 2i, R_NOPE + 2i + 1) are read back past L1 and rotated by angle
    pos[r] * inv[i] as the rope kernel does (norm.rotate: the same bits). pos: [R] ints."""
    tl.debug_barrier()
    i = tl.arange(0, BLOCK_HALF)[None, :]
    m = ok[:, None] & (i < HALF)
    even = rows[:, None] + R_NOPE + 2 * i
    a = tl.load(even, mask=m, other=0.0, cache_modifier=".cg")
    b = tl.load(even + 1, mask=m, other=0.0, cache_modifier=".cg")
    a, b = rotate(a, b, pos.to(tl.float32)[:, None], inv_ptr, i, HALF, rope_scale, INVERSE)
    tl.store(even, a, mask=m)
    tl.store(even + 1, b, mask=m)


@triton.jit
def _ring_kernel(new_ptr, ring_ptr, pos_ptr, S, slots, W: tl.constexpr, BLOCK_W: tl.constexpr):
    """The ring update at a device position p (read from pos_ptr): new row i (of S) goes to ring row
    (p + i) % slots if it is among the last `slots` rows. Grid: (S, B); new: [B, S, W], ring: [B, slots, W]."""
    i = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if i < S - slots:
        return
    row = (tl.load(pos_ptr) + i) % slots
    c = tl.arange(0, BLOCK_W)
    m = c < W
    tl.store(ring_ptr + (b * slots + row) * W + c, tl.load(new_ptr + (b * S + i) * W + c, mask=m), mask=m)


@triton.jit
def _merge_runs(part_ptr, ml_ptr, r, TH, r_ok, offs_d, D, SPLIT: tl.constexpr):
    """The SPLIT runs of rows r [R] of TH merged: sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p, M = max_p m_p
    (0 when every run saw nothing); run p's acc [SPLIT, TH, D] at row p * TH + r, m and l [2, SPLIT, TH]. The
    loads bypass L1 (.cg: in-kernel, other SMs wrote the runs)."""
    mask = r_ok[:, None] & (offs_d[None, :] < D)
    big = tl.full(r.shape, float("-inf"), tl.float32)
    for p in tl.static_range(SPLIT):
        big = tl.maximum(big, tl.load(ml_ptr + p * TH + r, mask=r_ok, other=float("-inf"), cache_modifier=".cg"))
    big = tl.where(big == float("-inf"), 0.0, big)
    num = tl.zeros([r.shape[0], offs_d.shape[0]], dtype=tl.float32)
    den = tl.zeros(r.shape, dtype=tl.float32)
    for p in range(SPLIT):  # a loop, not unrolled: unrolled, every run's [R, BLOCK_D] load was hoisted (spills)
        w = tl.exp(tl.load(ml_ptr + p * TH + r, mask=r_ok, other=float("-inf"), cache_modifier=".cg") - big)
        den += w * tl.load(ml_ptr + (SPLIT + p) * TH + r, mask=r_ok, other=0.0, cache_modifier=".cg")
        num += w[:, None] * tl.load(part_ptr + (p * TH + r).to(tl.int64)[:, None] * D + offs_d[None, :], mask=mask,
                                    other=0.0, cache_modifier=".cg")
    den = tl.where(r_ok, den, 1.0)  # rows past TH (not stored) divide by 1, not 0
    return num / den[:, None]


@triton.jit
def _combine_kernel(part_ptr, ml_ptr, out_ptr, rpos_ptr, inv_ptr, TH, D, S, H, rope_scale, SPLIT: tl.constexpr,
                    OUT_ROPE: tl.constexpr, HALF: tl.constexpr, INVERSE: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """out[r] = the SPLIT runs of row r < TH merged (_merge_runs); OUT_ROPE: then roped at position rpos[s] of its
    token (_rope_rows). Grid: (cdiv(TH, BLOCK_R),)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = r < TH
    tl.store(out_ptr + r.to(tl.int64)[:, None] * D + offs_d[None, :], _merge_runs(part_ptr, ml_ptr, r, TH, r_ok, offs_d,
             D, SPLIT), mask=r_ok[:, None] & (offs_d[None, :] < D))
    if OUT_ROPE:
        _rope_rows(out_ptr + r.to(tl.int64) * D, r_ok, tl.load(rpos_ptr + (r // H) % S, mask=r_ok, other=0), inv_ptr,
                   rope_scale, D - 2 * HALF, HALF, INVERSE, BLOCK_HALF)

"""The routed experts' pair bookkeeping (moe.py's grouped GEMMs): the T*k (token, slot) pairs of a call sorted
by expert, stably, and cut into tiles of <= BLOCK_M pairs of one expert, with fixed shapes and no host reads, so a
launch neither waits for the GPU nor changes between CUDA-graph replays. Up to PAIRS_KERNEL_MAX pairs (a decode
step) one kernel does it all (_pairs_kernel, a counting sort in one program), else torch ops (prefill). Up to
moe.PAIRS_IN_KERNEL_MAX pairs the gate_up GEMM's programs do it themselves instead (pair_tiles: a sort by
comparing every pair with every other, no launch of its own), with the same results.
"""

import torch
import triton
import triton.language as tl

from .common import cdiv, next_pow2


@triton.jit
def _pair_ids(idx_ptr, t0, T, K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr):
    """Expert ids of tokens t0 .. t0+BT-1 -> ([BT, KP] ids, -1 past T and K; [BT] tokens; [BT, KP] mask)."""
    tok = t0 + tl.arange(0, BT)
    j = tl.arange(0, KP)
    mask = (tok[:, None] < T) & (j[None, :] < K)
    ids = tl.load(idx_ptr + tok[:, None].to(tl.int64) * K + j[None, :], mask=mask, other=-1).to(tl.int32)
    return ids, tok, mask


@triton.jit
def _pairs_kernel(idx_ptr, w_ptr, rows_ptr, pw_ptr, slot_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, T, E, n_tiles,
                  bm, K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, BTL: tl.constexpr):
    """The grouped GEMMs' pair bookkeeping in one program (_pairs): pairs p = t*K + j sorted by expert, stably,
    as a counting sort. Pass 1 counts each expert's pairs; the tiles follow from the counts; pass 2 gives each
    pair its sorted position pos = start of its expert + pairs of that expert before it, and scatters
    rows[pos] = t, pw[pos] = w[p], and slot[t, rank of pos among t's] = pos (ascending = by expert)."""
    experts = tl.arange(0, BE)
    counts = tl.zeros([BE], dtype=tl.int32)
    for t0 in range(0, T, BT):
        ids, _, _ = _pair_ids(idx_ptr, t0, T, K, KP, BT)
        hit = tl.reshape(ids, [BT * KP])[:, None] == experts[None, :]
        counts += tl.sum(hit.to(tl.int32), axis=0)
    starts = tl.cumsum(counts, axis=0) - counts
    per = (counts + bm - 1) // bm  # tiles of each expert
    ends = tl.cumsum(per, axis=0)  # tiles up to each expert's end
    for t0 in range(0, n_tiles, BTL):
        t = t0 + tl.arange(0, BTL)
        te = tl.sum(((ends[None, :] <= t[:, None]) & (experts[None, :] < E)).to(tl.int32), axis=1)  # its expert
        used = te < E  # E: past the last expert's tile
        sel = experts[None, :] == tl.minimum(te, E - 1)[:, None]
        first = tl.sum(tl.where(sel, ends - per, 0), axis=1)  # the expert's first tile
        start = tl.sum(tl.where(sel, starts, 0), axis=1)
        lo = tl.where(used, start + (t - first) * bm, 0)
        hi = tl.where(used, start + tl.sum(tl.where(sel, counts, 0), axis=1), 0)
        tl.store(tile_e_ptr + t, tl.minimum(te, E - 1), mask=t < n_tiles)
        tl.store(tile_lo_ptr + t, lo, mask=t < n_tiles)
        tl.store(tile_hi_ptr + t, hi, mask=t < n_tiles)
    seen = tl.zeros([BE], dtype=tl.int32)
    for t0 in range(0, T, BT):
        ids, tok, mask = _pair_ids(idx_ptr, t0, T, K, KP, BT)
        hit = (tl.reshape(ids, [BT * KP])[:, None] == experts[None, :]).to(tl.int32)
        rank = tl.cumsum(hit, axis=0)  # 1-based rank among this block's pairs of the same expert
        pos = tl.sum(hit * ((starts + seen)[None, :] + rank - 1), axis=1)
        seen += tl.sum(hit, axis=0)
        pos = tl.reshape(pos, [BT, KP])
        pairs = tok[:, None].to(tl.int64) * K + tl.arange(0, KP)[None, :]
        tl.store(rows_ptr + pos, tl.broadcast_to(tok[:, None], [BT, KP]), mask=mask)
        tl.store(pw_ptr + pos, tl.load(w_ptr + pairs, mask=mask, other=0.0).to(tl.float32), mask=mask)
        below = (pos[:, None, :] < pos[:, :, None]) & mask[:, None, :]  # [t, j, j']: pair j' of t sorts before j
        slot = tl.sum(below.to(tl.int32), axis=2)
        tl.store(slot_ptr + tok[:, None].to(tl.int64) * K + slot, pos, mask=mask)


# --- the bookkeeping in the gate_up programs (PAIRS_IN_KERNEL) -------------------------------------
@triton.jit
def _sorted_pairs(idx_ptr, P, BIG, PP: tl.constexpr):
    """Pairs p < P (idx_ptr: their expert ids, flat [T*K]) -> ([PP] ids, BIG past P; the pairs' mask; each pair's
    position sorted by expert, stably; the position of its expert's first pair; that expert's pairs), from the
    [PP, PP] comparisons of every pair with every other (a counting sort without a count per expert)."""
    p = tl.arange(0, PP)
    ok = p < P
    e = tl.where(ok, tl.load(idx_ptr + p, mask=ok, other=0).to(tl.int32), BIG)
    lower = e[None, :] < e[:, None]  # [p, q]: q's expert is below p's
    same = e[None, :] == e[:, None]
    pos = tl.sum((lower | (same & (p[None, :] < p[:, None]))).to(tl.int32), axis=1)
    return e, ok, pos, tl.sum(lower.to(tl.int32), axis=1), tl.sum(same.to(tl.int32), axis=1)


@triton.jit
def pair_tiles(idx_ptr, w_ptr, pw_ptr, slot_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, t, P, E, bm, n_tiles,
               K: tl.constexpr, PP: tl.constexpr, BM: tl.constexpr, NT: tl.constexpr):
    """_pairs_kernel's bookkeeping of P <= PP pairs, by one gate_up program of tile t, which gets its tile's (expert,
    first pair, end of the expert's pairs) and its [BM] pairs' tokens back in registers and writes what the down
    GEMM and the combine read: pw, slot (each token's pairs' sorted positions) and the n_tiles tiles (<= NT), the
    same values as _pairs_kernel's (every program of the launch writes the same bytes)."""
    e, ok, pos, start, count = _sorted_pairs(idx_ptr, P, E, PP)
    p = tl.arange(0, PP)
    lead = ok & (pos == start)  # each expert's first pair: its expert's tiles, ceil(count / bm), come in order
    tiles_before = tl.sum(tl.where(lead[None, :] & (e[None, :] < e[:, None]), (count[None, :] + bm - 1) // bm, 0),
                          axis=1)
    tile = tl.where(ok, tiles_before + (pos - start) // bm, -1)  # [PP] each pair's tile
    tok = p // K
    tl.store(pw_ptr + pos, tl.load(w_ptr + p, mask=ok, other=0.0).to(tl.float32), mask=ok)
    rank = tl.sum(((tok[None, :] == tok[:, None]) & (pos[None, :] < pos[:, None])).to(tl.int32), axis=1)
    tl.store(slot_ptr + tok * K + rank, pos, mask=ok)
    ts = tl.arange(0, NT)
    sel = tile[None, :] == ts[:, None]  # [NT, PP]
    used = tl.max(sel.to(tl.int32), axis=1) > 0
    te = tl.where(used, tl.max(tl.where(sel, e, -1), axis=1), E - 1)
    lo = tl.where(used, tl.min(tl.where(sel, pos, P), axis=1), 0)
    hi = tl.where(used, tl.max(tl.where(sel, start + count, 0), axis=1), 0)
    tl.store(tile_e_ptr + ts, te, mask=ts < n_tiles)
    tl.store(tile_lo_ptr + ts, lo, mask=ts < n_tiles)
    tl.store(tile_hi_ptr + ts, hi, mask=ts < n_tiles)
    mine = ts == t  # (t < n_tiles <= NT)
    my_lo = tl.sum(tl.where(mine, lo, 0), axis=0)
    rows = tl.sum(tl.where(pos[None, :] == (my_lo + tl.arange(0, BM))[:, None], tok[None, :], 0), axis=1)
    return tl.sum(tl.where(mine, te, 0), axis=0), my_lo, tl.sum(tl.where(mine, hi, 0), axis=0), rows


# --- host glue -----------------------------------------------------------------------------------
PAIRS_KERNEL_MAX = 2048  # pairs up to which _pairs_kernel does the bookkeeping (one program; decode sizes)


def sort_pairs(idx, weights, n_experts, bm):
    """The grouped GEMMs' bookkeeping of the T*k (token, slot) pairs of idx / weights [T, k], sorted by expert
    (stable: each expert's pairs stay in (token, slot) order) and cut into tiles of <= bm pairs of one expert:
    -> rows [P] (each sorted pair's token), pw [P] (its routing weight, fp32), slot_rows [T, k] (each token's
    sorted pairs, ascending = by expert), and per tile its expert, first pair and the end of its expert's run
    (int32). Fixed shapes, no host reads (so a launch neither waits for the GPU nor changes between CUDA-graph
    replays): max_tiles(P, E, bm) tiles, the ones past the last expert's empty (first pair = end = 0).
    Up to PAIRS_KERNEL_MAX pairs (a decode step) one kernel does it all (_pairs_kernel), else torch ops
    (sort_pairs_torch: a device sort, ~30 small kernels)."""
    tokens, k = idx.shape
    if tokens * k > PAIRS_KERNEL_MAX:
        return sort_pairs_torch(idx, weights, n_experts, bm)
    rows, pw, slot_rows, tiles = pair_arrays(tokens, k, n_experts, bm, idx.device)
    n_tiles = tiles[0].numel()
    kp, be = next_pow2(k), max(16, next_pow2(n_experts))
    bt = max(1, min(next_pow2(tokens), 8192 // (kp * be)))  # a [pairs, experts] one-hot of <= 8192
    _pairs_kernel[(1,)](idx, weights, rows, pw, slot_rows, *tiles, tokens, n_experts, n_tiles, bm, K=k, KP=kp,
                        BT=bt, BE=be, BTL=max(1, min(next_pow2(n_tiles), 8192 // be)))
    return rows, pw, slot_rows, tiles


def pair_arrays(tokens: int, k: int, n_experts: int, bm: int, device) -> tuple:
    """sort_pairs' results, not yet written: rows [P], pw [P], slot_rows [T, k], the max_tiles tiles' (expert, first
    pair, end); int32 but pw (fp32)."""
    n_tiles = max_tiles(tokens * k, n_experts, bm)
    return (torch.empty(tokens * k, dtype=torch.int32, device=device),
            torch.empty(tokens * k, dtype=torch.float32, device=device),
            torch.empty(tokens, k, dtype=torch.int32, device=device),
            tuple(torch.empty(n_tiles, dtype=torch.int32, device=device) for _ in range(3)))


def sort_pairs_torch(idx, weights, n_experts, bm):
    """sort_pairs with torch ops, for many pairs (prefill)."""
    tokens, k = idx.shape
    flat_idx = idx.reshape(-1).long()
    n_tiles = max_tiles(flat_idx.numel(), n_experts, bm)
    order = torch.sort(flat_idx, stable=True).indices
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat_idx.device).scatter_add_(
        0, flat_idx, torch.ones_like(flat_idx))  # not bincount: it reads the largest id on the host
    per = (counts + bm - 1) // bm
    ends = torch.cumsum(per, 0)  # tiles before each expert's end
    t = torch.arange(n_tiles, device=flat_idx.device)
    tile_e = torch.searchsorted(ends, t, right=True)  # n_experts past the last tile
    used = tile_e < n_experts
    tile_e = tile_e.clamp_(max=n_experts - 1)
    nth = t - (ends - per)[tile_e]
    starts = torch.cumsum(counts, 0) - counts
    lo = torch.where(used, starts[tile_e] + nth * bm, 0)
    hi = torch.where(used, starts[tile_e] + counts[tile_e], 0)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)
    slot_rows = pos.view(tokens, k).sort(dim=1).values.int()
    pw = weights.reshape(-1).float()[order].contiguous()
    return (order // k).int(), pw, slot_rows, (tile_e.int(), lo.int(), hi.int())


def max_tiles(pairs: int, n_experts: int, bm: int) -> int:
    """Tiles of <= bm pairs of one expert that P pairs over E experts can need: sum_e ceil(c_e / bm) <=
    ceil(P / bm) + min(E, P) (each expert with pairs adds at most one partial tile)."""
    return cdiv(pairs, bm) + min(n_experts, pairs)

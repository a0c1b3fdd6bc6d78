"""The Lightning Indexer's top-k selection of compressed entries.

Scores (one program per (query token, batch row, tile of keys)):
    score[b, s, w] = sum_h (relu(q[b, s, h] . k[b, w]) * score_scale) * (weights[b, s, h] * weight_scale)
for causal entries w < (t + 1) // rate (t = pos0 + s), -inf otherwise; keys are decoded from
`key_format` in the kernel (f32, bf16, fp8_block: e4m3 with one fp32 scale per 128 values, fp4_block:
e2m1 two per byte, low nibble first, one UE8M0 scale per 32 values).

Selection (one program per (query token, batch row); where the arrival counters can be had, SUM_IN_KERNEL,
the last of the query's score programs to finish, so scores and selection are one launch): each causal score
becomes a sortable int64 key (order-preserving int32 image of the fp32 score << 32 | (2^31 - 1 - w)), so
the descending order of keys is "higher score first, then lower index", exactly torch.sort(stable=True) on
descending scores (-0.0 counts as +0.0, NaN ranks first). Tiles of KP = next_pow2(topk) keys are
merged into the running best KP by a bitonic top-k (tl.topk); picks past the causal ones are -1.
"""

import torch
import triton
import triton.language as tl

from .common import (STORAGE_DTYPES, arrived_last, bf16_value, cdiv, check, check_tensor, e2m1_value, entry_layout,
                     in_kernel_counters, launch_config, next_pow2, position, result, same_device, sm_count,
                     ue8m0_value)
from .norm import rope_operands, rope_rows

FORMATS = {"f32": 0, "bf16": 1, "fp8_block": 2, "fp4_block": 3}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PAD_KEY: tl.constexpr = tl.constexpr(-(2**63))  # below every real key


# --- key decoding (device) -----------------------------------------------------------------
@triton.jit
def _load_keys(base, rows, row_ok, offs_d, D: tl.constexpr, W: tl.constexpr, FMT: tl.constexpr):
    """Decode key rows `rows` [BT] (row_ok [BT]) of width W into fp32 [BT, BD]; others read 0.
    fp8_block: e4m3[d] * f32 scale at bytes D + 4 (d // 128), read as one fp32 where D is a multiple of 4 (so
    is W: the scales are aligned), else as four bytes; fp4_block: nibble d of byte d // 2 times
    2^(byte[ceil(D/2) + d // 32] - 127). D and W are constexprs, so the loads vectorize."""
    ptr = base + rows.to(tl.int64)[:, None] * W  # [BT, 1]
    d = offs_d[None, :]
    ok = row_ok[:, None] & (d < D)  # [BT, BD]
    if FMT == 0:
        return tl.load(ptr + d, mask=ok, other=0.0)
    elif FMT == 1:
        return bf16_value(tl.load(ptr + d, mask=ok, other=0))
    elif FMT == 2:
        byte = tl.load(ptr + d, mask=ok, other=0)
        s = ptr + D + 4 * (d // 128)
        if D % 4 == 0:
            scale = tl.load(s.to(tl.pointer_type(tl.float32)), mask=ok, other=0.0)
        else:
            sb = tl.load(s, mask=ok, other=0).to(tl.uint32)
            sb |= tl.load(s + 1, mask=ok, other=0).to(tl.uint32) << 8
            sb |= tl.load(s + 2, mask=ok, other=0).to(tl.uint32) << 16
            sb |= tl.load(s + 3, mask=ok, other=0).to(tl.uint32) << 24
            scale = sb.to(tl.float32, bitcast=True)
        return byte.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale
    else:
        byte = tl.load(ptr + d // 2, mask=ok, other=0).to(tl.int32)
        code = tl.where(d % 2 == 0, byte & 0xF, byte >> 4)
        sc = tl.load(ptr + (D + 1) // 2 + d // 32, mask=ok, other=127)
        return e2m1_value(code) * ue8m0_value(sc)


@triton.jit
def _score_kernel(q_ptr, w_ptr, k_ptr, out_ptr, pos_ptr, sel_ptr, cnt_ptr, qr_ptr, rpos_ptr, inv_ptr, S, H, T, TOPK,
                  pos0, rate, k_stride, score_scale, weight_scale, rope_scale, D: tl.constexpr, W: tl.constexpr,
                  FMT: tl.constexpr, DEVICE_POS: tl.constexpr, SELECT: tl.constexpr, KP: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, Q_ROPE: tl.constexpr, HALF: tl.constexpr,
                  INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_NOPE: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """out[b, s, w] for w in one key tile (w < T), -inf where w >= (pos0 + s + 1) // rate.
    Grid: (S, B, cdiv(T, BLOCK_T)). q: [B, S, H, D], weights: [B, S, H], keys: [B, k_stride, W].
    DEVICE_POS: pos0 is read from pos_ptr, T is the keys' capacity, the grid's third axis is a fixed number of
    programs (not one per tile of the capacity), each scoring every num_programs-th tile of the causal
    entries; tiles past them are not written (the selection reads only causal scores).
    SELECT: the last of query (b, s)'s programs to arrive at cnt_ptr[b * S + s] (common.arrived_last) then picks
    its top-k into sel_ptr, as _topk_kernel does (one launch fewer).
    Q_ROPE (rope_index_topk): q is the raw queries; each program first rotates its query's H rows into qr at
    position rpos[s] (norm.rope_rows, the rope kernel's row code: inv_ptr, rope_scale, INVERSE; every program of
    the query writes the same bytes) and reads them back past L1 (".cg") after a barrier."""
    s, b, tb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    Q_CACHE: tl.constexpr = ".cg" if Q_ROPE else ""
    q_src = q_ptr
    if Q_ROPE:
        # heads a pass, unrolled (all 64 of V4's at once: 158 registers under Triton 3.6; a run-time loop over them
        # made ptxas spill 12 B a thread at 16 heads, one pass)
        RH: tl.constexpr = min(BLOCK_H, 16)
        for h0 in tl.static_range(0, BLOCK_H, RH):
            heads = h0 + tl.arange(0, RH)
            rows = (b * S + s).to(tl.int64) * H + heads
            rope_rows(q_ptr, qr_ptr, rows, heads < H, tl.load(rpos_ptr + s + 0 * heads), inv_ptr, rope_scale, D,
                      D - 2 * HALF, HALF, INVERSE, BLOCK_NOPE, BLOCK_HALF)
        tl.debug_barrier()
        q_src = qr_ptr
    if DEVICE_POS:
        pos0 = tl.load(pos_ptr).to(tl.int32)
        limit = (pos0 + s + 1) // rate
        for tile in range(tb, tl.cdiv(limit, BLOCK_T), tl.num_programs(2)):
            _score_tile(q_src, w_ptr, k_ptr, out_ptr, s, b, tile, limit, S, H, T, k_stride, score_scale,
                        weight_scale, D, W, FMT, BLOCK_T, BLOCK_D, Q_CACHE)
    else:
        _score_tile(q_src, w_ptr, k_ptr, out_ptr, s, b, tb, (pos0 + s + 1) // rate, S, H, T, k_stride, score_scale,
                    weight_scale, D, W, FMT, BLOCK_T, BLOCK_D, Q_CACHE)
    if SELECT:
        if arrived_last(cnt_ptr + b * S + s, tl.num_programs(2)):
            _select(out_ptr, sel_ptr, s, b, S, T, TOPK, pos0, rate, KP, ".cg")  # (other SMs wrote the scores)


@triton.jit
def _score_tile(q_ptr, w_ptr, k_ptr, out_ptr, s, b, tb, limit, S, H, T, k_stride, score_scale, weight_scale,
                D: tl.constexpr, W: tl.constexpr, FMT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                Q_CACHE: tl.constexpr):
    """Key tile tb of query (b, s), whose causal entries are w < limit.
    One head at a time: its [BT] dots are the key tile times the head's query row, summed over the channels
    (fp32 FMAs). An fp32 tl.dot over a block of heads lowers, without tensor cores, to operands that hold
    whole K rows per thread: at V4's 64 x 128 it spilled ~7 KB a thread on sm_90a (bench/sm90_static.py)."""
    w = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    keys = _load_keys(k_ptr, b * k_stride + w, w < limit, offs_d, D, W, FMT)  # [BT, BD]
    token = (b * S + s).to(tl.int64)
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for h in range(0, H):
        q = tl.load(q_ptr + (token * H + h) * D + offs_d, mask=offs_d < D, other=0.0,
                    cache_modifier=Q_CACHE).to(tl.float32)  # [BD]
        wt = tl.load(w_ptr + token * H + h).to(tl.float32) * weight_scale
        dots = tl.sum(keys * q[None, :], axis=1)  # [BT]
        relu = tl.maximum(dots, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as torch.relu
        acc += relu * score_scale * wt
    tl.store(out_ptr + token * T + w, tl.where(w < limit, acc, float("-inf")), mask=w < T)


# --- selection (device) ----------------------------------------------------------------------
@triton.jit
def _sort_key(score, w):
    """fp32 score [N], int index [N] -> int64 key, larger = (higher score, then lower index)."""
    score = score + 0.0  # -0.0 -> +0.0: torch compares them equal
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float order
    ordered = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FFFFFFF, ordered)  # NaN first, as torch.sort
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - w).to(tl.int64)


@triton.jit
def _topk_kernel(scores_ptr, out_ptr, pos_ptr, S, T, TOPK, pos0, rate, DEVICE_POS: tl.constexpr, KP: tl.constexpr):
    """_select for query (b, s) = (program 1, program 0). Grid: (S, B). DEVICE_POS: pos0 is read from pos_ptr."""
    if DEVICE_POS:
        pos0 = tl.load(pos_ptr).to(tl.int32)
    _select(scores_ptr, out_ptr, tl.program_id(0), tl.program_id(1), S, T, TOPK, pos0, rate, KP, "")


@triton.jit
def _select(scores_ptr, out_ptr, s, b, S, T, TOPK, pos0, rate, KP: tl.constexpr, CACHE: tl.constexpr):
    """out[b, s, :TOPK] = the causal entries' indices by score, best first, lower index on ties,
    -1 past the causal ones. scores: [B, S, T], out: [B, S, TOPK] int64."""
    token = (b * S + s).to(tl.int64)
    limit = tl.minimum((pos0 + s + 1) // rate, T)
    best = tl.full([KP], PAD_KEY, dtype=tl.int64)
    for start in range(0, limit, KP):
        w = start + tl.arange(0, KP)
        score = tl.load(scores_ptr + token * T + w, mask=w < limit, other=0.0, cache_modifier=CACHE)
        key = tl.where(w < limit, _sort_key(score, w), PAD_KEY)
        best = tl.topk(tl.reshape(tl.join(best, key), [2 * KP]), KP)  # best KP of 2 KP, sorted
    idx = tl.where(best == PAD_KEY, -1, 0x7FFFFFFF - (best & 0xFFFFFFFF))
    k = tl.arange(0, KP)
    tl.store(out_ptr + token * TOPK + k, idx, mask=k < TOPK)


# --- host ------------------------------------------------------------------------------------
def _check_keys(name, t, batch, fmt, width):
    check_tensor(name, t, dtypes=(STORAGE_DTYPES[fmt],), dim=3)
    check(t.shape[0] == batch and t.shape[2] == width,
          f"{name}: expected [{batch}, T, {width}] ({fmt} storage), got {list(t.shape)}")


def _check_inputs(q, weights, state, pos0, topk, rate, key_format):
    check(key_format in FORMATS, f"key_format {key_format!r} is not supported; expected one of {list(FORMATS)}")
    check_tensor("q", q, dtypes=FLOAT_DTYPES, dim=4, contiguous=False)
    batch, s, heads, _ = q.shape
    check_tensor("weights", weights, dtypes=FLOAT_DTYPES, dim=3, contiguous=False)
    check(tuple(weights.shape) == (batch, s, heads), f"weights: expected [{batch}, {s}, {heads}], got {list(weights.shape)}")
    check(isinstance(topk, int) and topk >= 0, f"topk: expected an int >= 0, got {topk!r}")
    check(isinstance(rate, int) and rate > 0, f"rate: expected an int > 0, got {rate!r}")
    check(isinstance(state, (tuple, list)) and len(state) == 1, "state: expected (indexer keys,)")
    if isinstance(state[0], torch.Tensor):
        _check_keys("state[0] (indexer keys)", state[0], batch, key_format, entry_layout(key_format, q.shape[-1])[1])
    same_device(q=q, weights=weights, keys=state[0])
    host_pos = position(pos0, q.device)
    check(host_pos is not None or isinstance(state[0], torch.Tensor),
          "pos0: a device position needs the indexer keys as a tensor, not a tiered store (which reads the keys "
          "written so far on the host)")
    return host_pos


def _config(config):
    defaults = {"BLOCK_T": 32, "num_warps": 4, "SUM_IN_KERNEL": "auto"}
    return launch_config(config, defaults, "index_topk")


SCORE_PROGRAMS_PER_SM = 8  # a device position's score grid: (query, batch row) programs times this many per SM (2 off a
# GPU, so the tests loop); a capacity-sized grid would launch ~8k programs a query at V4's 1M context, most idle


def index_scores(q, weights, keys, *, pos0, rate, score_scale, weight_scale, key_format, cfg, select=None, rope=None):
    """q: [B, S, H, Di], weights: [B, S, H], keys: [B, >= T, W] storage -> scores [B, S, T] fp32,
    T = (pos0 + S) // rate, -inf where not causal (`_score_kernel`). With a device position (pos0 a tensor)
    T is the keys' capacity and only the causal scores are written. select: (picks [B, S, topk] int64, arrival
    counters): the score kernel also picks each query's top-k (SELECT). rope: None, or (positions [S], inv_freq fp32,
    inverse, scale): q is the raw queries, roped by every score program (Q_ROPE)."""
    batch, s, heads, d = q.shape
    device_pos = isinstance(pos0, torch.Tensor)
    n_entries = keys.shape[1] if device_pos else (pos0 + s) // rate
    scores = torch.empty(batch, s, n_entries, dtype=torch.float32, device=q.device)
    if batch * s * n_entries:
        view = keys.view(torch.int16) if keys.dtype == torch.bfloat16 else keys
        tiles = cdiv(n_entries, cfg["BLOCK_T"])
        if device_pos:  # a fixed number of programs looping over the causal tiles, whatever the capacity
            tiles = min(tiles, max(2, cdiv(SCORE_PROGRAMS_PER_SM * sm_count(q.device), s * batch)))
        picks, counters = select or (scores, scores)
        positions, inv, inverse, rope_scale = rope or (scores, scores, False, 1.0)
        half = inv.shape[0] if rope else 0
        roped = torch.empty(q.shape, dtype=torch.float32, device=q.device) if rope else scores
        _score_kernel[(s, batch, tiles)](
            q, weights, view, scores, pos0 if device_pos else scores, picks, counters, roped, positions, inv, s, heads,
            n_entries, picks.shape[-1] if select else 0, 0 if device_pos else pos0, rate, keys.shape[1],
            float(score_scale), float(weight_scale), float(rope_scale), D=d, W=keys.shape[2], FMT=FORMATS[key_format],
            DEVICE_POS=device_pos, SELECT=select is not None, KP=next_pow2(picks.shape[-1]) if select else 1,
            BLOCK_T=cfg["BLOCK_T"], BLOCK_D=next_pow2(d), Q_ROPE=rope is not None, HALF=half, INVERSE=bool(inverse),
            BLOCK_H=next_pow2(heads), BLOCK_NOPE=next_pow2(d - 2 * half), BLOCK_HALF=next_pow2(max(half, 1)),
            num_warps=cfg["num_warps"])
    return scores


def index_topk(q, weights, *, state, pos0, topk, rate, score_scale, weight_scale, key_format="f32", config=None,
               into=None):
    """Pick up to `topk` causal compressed entries per query by indexer score.
    q: [B, S, H, Di] roped indexer queries, weights: [B, S, H]; state: (indexer keys [B, T, W] in
    `key_format`, or a tiered store,). -> [B, S, topk] int64 entry indices, best first; ties go to
    the lower index; -1 pads. pos0: an int, or a device position (common.position): the launches then do
    not depend on it (a decode step captured as a CUDA graph), and the entries' count is the kernels' to read."""
    return _index_topk(q, weights, state, pos0, topk, rate, score_scale, weight_scale, key_format, config, into, None)


def rope_index_topk(q, weights, positions, inv_freq, *, state, pos0, topk, rate, score_scale, weight_scale,
                    key_format="f32", q_rope, config=None, into=None):
    """index_topk(rope(q, positions, inv_freq, **q_rope), weights, ..) in the same launches (the fuse pass's
    rope_index): every score program rotates its query's rows as the rope kernel does, the same bits; q is the
    raw queries. q_rope: the rope's attributes {inverse?, scale?}."""
    rope = rope_operands("q_rope", q, positions, inv_freq, q_rope)
    return _index_topk(q, weights, state, pos0, topk, rate, score_scale, weight_scale, key_format, config, into, rope)


def _index_topk(q, weights, state, pos0, topk, rate, score_scale, weight_scale, key_format, config, into, rope):
    """index_topk, with rope_index_topk's query RoPE (index_scores' rope) or without."""
    host_pos = _check_inputs(q, weights, state, pos0, topk, rate, key_format)
    q, weights = q.contiguous(), weights.contiguous()  # inputs may be views; the keys may not
    batch, s, heads, d = q.shape
    cfg = _config(config)
    out = result(into, (batch, s, topk), torch.long, q.device)  # the top-k kernel writes every slot
    keys, device_pos = state[0], host_pos is None
    n_entries = keys.shape[1] if device_pos else (host_pos + s) // rate
    if n_entries == 0 or topk == 0 or batch * s == 0:
        return out.fill_(-1)
    width = entry_layout(key_format, d)[1]
    if not isinstance(keys, torch.Tensor):  # a tiered store: its first n_entries rows, on the host
        keys = keys.read(n_entries).contiguous()
        _check_keys("indexer keys read", keys, batch, key_format, width)
    check(keys.shape[1] >= n_entries, f"state[0] (indexer keys): {n_entries} closed windows but capacity {keys.shape[1]}")
    # the picks by the last score program of each query (SUM_IN_KERNEL), else by the top-k kernel
    counters = in_kernel_counters(cfg["SUM_IN_KERNEL"], q.device, batch * s, "index_topk")
    scores = index_scores(q, weights, keys, pos0=pos0, rate=rate, score_scale=score_scale, weight_scale=weight_scale,
                          key_format=key_format, cfg=cfg, select=None if counters is None else (out, counters),
                          rope=rope)
    if counters is None:
        _topk_kernel[(s, batch)](scores, out, pos0 if device_pos else out, s, n_entries, topk,
                                 0 if device_pos else pos0, rate, DEVICE_POS=device_pos, KP=next_pow2(topk),
                                 num_warps=cfg["num_warps"])
    return out


index_topk.device_position = True  # takes pos0 as a device tensor (common.position)
rope_index_topk.device_position = True


LAUNCHERS = {"index_topk": index_topk, "rope_index_topk": rope_index_topk}

"""Sparse shared-KV attention with per-head sinks over the sliding window plus compressed entries.

One program per (query token, batch row, block of heads) runs an online softmax over
  (a) the window keys the query sees: positions (t - window, t], read from the ring (position p
      lives in row p % (window - 1)) for p < pos0 and from this call's new keys otherwise;
  (b) compressed entries: CSA reads the query's selected entries (row b * capacity + k of the entries
      viewed as [B * capacity, W], -1 = none: paged KV), HCA reads every closed window w < (t + 1) // rate;
  (c) the head's sink logit, which seeds the running max (m = sink, l = 1, acc = 0).
K = V (one KV head shared by all query heads); logits = (q . k) * scale.

Keys are decoded from their storage format in the kernel (f32, bf16, or fp8_split: [nope e4m3 |
rope bf16 | one UE8M0 scale per 64 nope channels | zero padding to 8 bytes]). The new keys are
first encoded by a Triton kernel exactly as `quant.encode_entries` does (round to nearest even by
integer arithmetic, the UE8M0 exponent exactly: common.ceil_log2 of the group scale), so a token's key
reads the same in prefill and decode, and the ring rows written back are bit-identical to the reference's.
"""

import torch
import triton
import triton.language as tl

from .common import (STORAGE_DTYPES, arrived_last, cdiv, check, check_tensor, config_switch, entry_layout,
                     in_kernel_counters, launch_config, native_cvt, next_pow2, position, result, same_device, sm_count,
                     to_bf16)
from .attention_finish import _combine_kernel, _merge_runs, _ring_kernel, _rope_rows
from .attention_step import _fold_keys
from .kv_codec import FORMATS, encode_blocks, encode_kv, encode_row, storage_for, storage_view
from .norm import norm_rope_row, rms_norm_rope
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)
SLIDING, CSA, HCA, CSA_GATHERED = 0, 1, 2, 3  # CSA_GATHERED: CSA over picks gathered from a tiered store


# --- attention (device) ------------------------------------------------------------------------
@triton.jit
def _attention_kernel(q_ptr, kv_ptr, ring_ptr, new_ptr, ent_ptr, table_ptr, sinks_ptr, out_ptr, ml_ptr, fin_ptr,
                      cnt_ptr, pos_ptr, rpos_ptr, inv_ptr, qn_ptr, kvn_ptr, kvw_ptr, S, H, K, pos0, n_old, slots,
                      window, rate, ent_stride, scale, per_split, rope_scale, q_eps, q_rope, kv_eps, kv_rope,
                      D: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr, W: tl.constexpr, MODE: tl.constexpr,
                      FMT: tl.constexpr, SPLIT: tl.constexpr, DOT: tl.constexpr,
                      KDT: tl.constexpr, NATIVE: tl.constexpr, DEVICE_POS: tl.constexpr, IN_KERNEL: tl.constexpr,
                      RING: tl.constexpr, OUT_ROPE: tl.constexpr, HALF: tl.constexpr, INVERSE: tl.constexpr,
                      ENCODE: tl.constexpr, VP: tl.constexpr, QC: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_G: tl.constexpr,
                      BLOCK_R: tl.constexpr, Q_NORM: tl.constexpr, KV_NORM: tl.constexpr, Q_INV: tl.constexpr,
                      KV_INV: tl.constexpr, BLOCK_NOPE: tl.constexpr):
    """out[b, s, h] = softmax over [window keys | entries | sink] of (q[b, s, h] . k) * scale, applied
    to the keys. Grid: (cdiv(H, BLOCK_H) * VP * SPLIT, S, B), head blocks innermost, then value parts.
    q, out: [B, S, H, D]; ring: [B, slots, W]; new: [B, S, W]; entries: [B, ent_stride, W]; table: [B, S, K] the
    selected entries (CSA: -1 none; row b * ent_stride + k of the entries; CSA_GATHERED, rows gathered per pick:
    the pick's own row)
    SPLIT > 1 (flash-decoding): the query's key list (window keys, then entries) is cut into SPLIT runs
    of `per_split` keys; run p (the sink goes with run 0) writes its unnormalized acc to out [SPLIT, B, S,
    H, D] and its (max, sum) to ml [2, SPLIT, B, S, H], which _combine_kernel merges into out, or (IN_KERNEL)
    the last run of the (token, head block) to arrive at its counter (common.arrived_last) merges into fin.
    RING (IN_KERNEL): the last program of batch row b to arrive at its counter (b, after the B * S * head blocks
    counters when split) writes b's new keys into its ring (after every program of the row has read the ring
    rows they replace).
    DOT: the dots' input precision, "ieee" (fp32), "tf32" (tensor cores: q and the probabilities rounded
    to 10 mantissa bits) or "bf16" (tensor cores: q and the probabilities rounded to 8 bits, key tiles
    half the registers of fp32 ones); fp8_split and bf16 keys are exact in all three. KDT: the key tiles'
    dtype, bf16 for bf16 dots, else fp32.
    VP > 1 (value parts): each program computes its heads' full scores but only channels
    [vp * BD / VP, (vp + 1) * BD / VP) of their outputs, over that part of each key tile decoded again (from L1 / L2):
    an accumulator of [BLOCK_H, BD / VP] lets a program hold more heads, so fewer programs read each key. Every part
    stores the same (max, sum); a split's last program to arrive (of SPLIT * VP) merges all the parts' channels.
    QC < BLOCK_D: the scores are summed over chunks of QC channels (_fold_keys), the queries read chunk by chunk.
    Each key tile is decoded once (twice with value parts or chunks): a window key's row pointer is the ring's
    (p < pos0) or the new keys'.
    The ring holds min(pos0, n_old) old keys. DEVICE_POS: pos0 is read from pos_ptr (n_old is then the ring's
    size), and the runs of a split cover the most keys any position has: runs past this position's keys
    store an empty (max -inf, sum 0) result, which the combine weighs 0.
    OUT_ROPE (attention_rope): each finished output row then has RoPE applied to its last 2 HALF channels at
    position rpos[s] (inv_ptr, rope_scale, INVERSE: _rope_rows), where the rope kernel would have.
    ENCODE (ENCODE_IN_KERNEL, a few new tokens): every program first encodes its batch row's new keys kv [B, S, D]
    into new (kv_codec.encode_row, the encode kernel's code): every program of the row writes the same bytes, so
    after a barrier its own rows read back (".cg": past L1, as the in-kernel merges read) whichever
    program's write landed last. The encode launch is saved; the barrier cannot be checked in the interpreter.
    Q_NORM, KV_NORM (norm_attention_rope): q, and with ENCODE kv, are the raw queries and keys; the program first
    norms and rotates its query rows into qn and (KV_NORM) its batch row's new keys into kvn, at positions rpos[s]
    with the rms_norm_rope kernel's row code (norm.norm_rope_row: eps, RoPE scale and INVERSE of each, kv's norm
    weight kvw), and reads them back after a barrier as above."""
    pid, s, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NEW_CACHE: tl.constexpr = ".cg" if ENCODE else ""  # the new keys' rows: this launch's own writes
    if ENCODE:
        src = kv_ptr
        if KV_NORM:
            for i in range(S):
                row = (b * S + i).to(tl.int64) * D
                norm_rope_row(kv_ptr + row, kvw_ptr, kvn_ptr + row, tl.load(rpos_ptr + i), inv_ptr, kv_rope, kv_eps, D,
                              D - 2 * HALF, HALF, KV_INV, True, BLOCK_D, BLOCK_NOPE, BLOCK_HALF)
            tl.debug_barrier()
            src = kvn_ptr
        for i in range(S):
            row = (b * S + i).to(tl.int64)
            encode_row(src + row * D, new_ptr + row * W, D, NOPE, ROPE, W, FMT, BLOCK_D, BLOCK_G, BLOCK_R, NEW_CACHE)
    if DEVICE_POS:
        pos0 = tl.load(pos_ptr).to(tl.int32)
    n_old = tl.minimum(n_old, pos0)
    n_hb = tl.cdiv(H, BLOCK_H)
    hb, vp, part = pid % n_hb, pid // n_hb % VP, pid // (n_hb * VP)  # head blocks innermost: the programs reading
    # the same keys run together
    BLOCK_V: tl.constexpr = BLOCK_D // VP
    offs_v = vp * BLOCK_V + tl.arange(0, BLOCK_V)
    t = pos0 + s  # the query's position
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    token = b * S + s
    if Q_NORM:  # (every run of a split writes the same bytes)
        for h in range(hb * BLOCK_H, tl.minimum(hb * BLOCK_H + BLOCK_H, H)):
            row = (token * H + h).to(tl.int64) * D
            norm_rope_row(q_ptr + row, q_ptr, qn_ptr + row, tl.load(rpos_ptr + s), inv_ptr, q_rope, q_eps, D,
                          D - 2 * HALF, HALF, Q_INV, False, BLOCK_D, BLOCK_NOPE, BLOCK_HALF)
    if ENCODE or Q_NORM:
        tl.debug_barrier()
    q_mask = (heads[:, None] < H) & (offs_d[None, :] < D)
    Q_CACHE: tl.constexpr = ".cg" if Q_NORM else ""
    q_rows = (qn_ptr if Q_NORM else q_ptr) + (token * H + heads).to(tl.int64) * D  # [BH]
    if QC == BLOCK_D:  # the whole queries, held (else read chunk by chunk in _fold_keys)
        q = tl.load(q_rows[:, None] + offs_d[None, :], mask=q_mask, other=0.0, cache_modifier=Q_CACHE).to(tl.float32)
        if DOT == "bf16":
            q = to_bf16(q, NATIVE)
    else:
        q = 0.0
    m_i = tl.load(sinks_ptr + heads, mask=heads < H, other=0.0).to(tl.float32)  # [BH]
    if part > 0:
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
    acc = tl.zeros([BLOCK_H, BLOCK_V], dtype=tl.float32)

    lo = tl.maximum(t - window + 1, pos0 - n_old)  # window positions [lo, t]
    n_win = t + 1 - lo
    u0 = part * per_split  # this run's keys: [u0, u1) of [window keys | entries]
    u1 = u0 + per_split
    w_hi = lo + tl.minimum(u1, n_win)
    for start in range(lo + tl.minimum(u0, n_win), w_hi, BLOCK_N):
        p = start + tl.arange(0, BLOCK_N)
        ok = p < w_hi
        rows = tl.where(p < pos0, ring_ptr + (b * slots + p % slots).to(tl.int64) * W,
                        new_ptr + (b * S + p - pos0).to(tl.int64) * W)
        m_i, l_i, acc = _fold_keys(q, q_rows, heads < H, rows, ok, vp * BLOCK_V, scale, m_i, l_i, acc, D, NOPE, ROPE,
                                   FMT, KDT, NATIVE, DOT, BLOCK_D, BLOCK_V, QC, NEW_CACHE, Q_CACHE)

    e0 = tl.maximum(u0 - n_win, 0)
    e1 = tl.maximum(u1 - n_win, 0)
    if MODE == 1 or MODE == 3:  # CSA: the selected entries
        e_hi = tl.minimum(e1, K)
        for start in range(tl.minimum(e0, K), e_hi, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            sel = tl.load(table_ptr + token.to(tl.int64) * K + j, mask=j < e_hi, other=-1)
            ok = sel >= 0
            if MODE == 3:
                rows = token.to(tl.int64) * K + j
            else:
                rows = b.to(tl.int64) * ent_stride + sel
            m_i, l_i, acc = _fold_keys(q, q_rows, heads < H, ent_ptr + tl.maximum(rows, 0).to(tl.int64) * W, ok,
                                       vp * BLOCK_V, scale, m_i, l_i, acc, D, NOPE, ROPE, FMT, KDT, NATIVE, DOT,
                                       BLOCK_D, BLOCK_V, QC, "", Q_CACHE)
    elif MODE == 2:  # HCA: every closed window, causally
        e_hi = tl.minimum(e1, (t + 1) // rate)
        for start in range(tl.minimum(e0, e_hi), e_hi, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            ok = j < e_hi
            m_i, l_i, acc = _fold_keys(q, q_rows, heads < H, ent_ptr + (b * ent_stride + j).to(tl.int64) * W, ok,
                                       vp * BLOCK_V, scale, m_i, l_i, acc, D, NOPE, ROPE, FMT, KDT, NATIVE, DOT,
                                       BLOCK_D, BLOCK_V, QC, "", Q_CACHE)

    n_rows = tl.num_programs(2) * S
    v_mask = (heads[:, None] < H) & (offs_v[None, :] < D)
    if SPLIT == 1:
        tl.store(out_ptr + (token * H + heads[:, None]).to(tl.int64) * D + offs_v[None, :], acc / l_i[:, None],
                 mask=v_mask)
        if OUT_ROPE and vp == VP - 1:  # (the host checks that the RoPE channels lie in the last part)
            _rope_rows(out_ptr + (token * H + heads).to(tl.int64) * D, heads < H, tl.load(rpos_ptr + s + 0 * heads),
                       inv_ptr, rope_scale, D - 2 * HALF, HALF, INVERSE, BLOCK_HALF)
    else:
        rows_ml = (part * n_rows + token) * H + heads  # [BH] in [SPLIT, B, S, H]
        if vp == 0:
            tl.store(ml_ptr + rows_ml, m_i, mask=heads < H)
            tl.store(ml_ptr + SPLIT * n_rows * H + rows_ml, l_i, mask=heads < H)
        tl.store(out_ptr + rows_ml.to(tl.int64)[:, None] * D + offs_v[None, :], acc, mask=v_mask)
        if IN_KERNEL:
            if arrived_last(cnt_ptr + token * n_hb + hb, SPLIT * VP):
                for vq in tl.static_range(VP):  # (a part's channels at a time: the registers of one accumulator)
                    offs_q = vq * BLOCK_V + tl.arange(0, BLOCK_V)
                    merged = _merge_runs(out_ptr, ml_ptr, token * H + heads, n_rows * H, heads < H, offs_q, D, SPLIT)
                    tl.store(fin_ptr + (token * H + heads[:, None]).to(tl.int64) * D + offs_q[None, :], merged,
                             mask=(heads[:, None] < H) & (offs_q[None, :] < D))
                if OUT_ROPE:
                    _rope_rows(fin_ptr + (token * H + heads).to(tl.int64) * D, heads < H,
                               tl.load(rpos_ptr + s + 0 * heads), inv_ptr, rope_scale, D - 2 * HALF, HALF, INVERSE,
                               BLOCK_HALF)
    if RING:
        ring_cnt = cnt_ptr + b  # after the (token, head block) counters when split
        if SPLIT > 1:
            ring_cnt += n_rows * n_hb
        if arrived_last(ring_cnt, n_hb * VP * SPLIT * S):
            c = tl.arange(0, BLOCK_W)
            for i in range(tl.maximum(S - slots, 0), S):
                dest = ring_ptr + (b * slots + (pos0 + i) % slots).to(tl.int64) * W
                new_row = new_ptr + (b * S + i).to(tl.int64) * W
                tl.store(dest + c, tl.load(new_row + c, mask=c < W, cache_modifier=NEW_CACHE), mask=c < W)


# --- host ------------------------------------------------------------------------------------
def _check_entries(name, t, batch, fmt, width):
    check_tensor(name, t, dtypes=(STORAGE_DTYPES[fmt],), dim=3)
    check(t.shape[0] == batch and t.shape[2] == width,
          f"{name}: expected [{batch}, T, {width}] ({fmt} storage), got {list(t.shape)}")


def _check_inputs(q, kv, sinks, selected, state, window, rate, kv_format, rope_dim):
    check(kv_format in FORMATS, f"kv_format {kv_format!r} is not supported; expected one of {list(FORMATS)}")
    check_tensor("q", q, dtypes=FLOAT_DTYPES, dim=4, contiguous=False)
    batch, s, heads, d = q.shape
    check_tensor("kv", kv, dtypes=FLOAT_DTYPES, dim=3, contiguous=False)
    check(tuple(kv.shape) == (batch, s, d), f"kv: expected [{batch}, {s}, {d}], got {list(kv.shape)}")
    check_tensor("sinks", sinks, dtypes=FLOAT_DTYPES, dim=1, contiguous=False)
    check(sinks.shape[0] == heads, f"sinks: expected [{heads}], got {list(sinks.shape)}")
    check(isinstance(window, int) and window >= 1, f"window: expected an int >= 1, got {window!r}")
    check(isinstance(rope_dim, int) and 0 <= rope_dim <= d, f"rope_dim: expected 0 <= rope_dim <= {d}, got {rope_dim!r}")
    check(isinstance(state, (tuple, list)) and len(state) in (1, 2), "state: expected (ring,) or (ring, entries)")
    width = entry_layout(kv_format, d, rope_dim)[1]
    _check_entries("state[0] (ring)", state[0], batch, kv_format, width)
    check(state[0].shape[1] == window - 1, f"state[0] (ring): expected {window - 1} rows (window - 1), got {state[0].shape[1]}")
    if len(state) > 1 and isinstance(state[1], torch.Tensor):
        _check_entries("state[1] (entries)", state[1], batch, kv_format, width)
    if len(state) > 1 and selected is not None:
        check_tensor("selected", selected, dtypes=INDEX_DTYPES, dim=3, contiguous=False)
        check(tuple(selected.shape[:2]) == (batch, s), f"selected: expected [{batch}, {s}, K], got {list(selected.shape)}")
    elif len(state) > 1:
        check(isinstance(rate, int) and rate > 0, f"rate: HCA (entries without selected) needs an int rate > 0, got {rate!r}")
    same_device(q=q, kv=kv, sinks=sinks, selected=selected, ring=state[0],
                entries=state[1] if len(state) > 1 else None)


def _config(config, heads, d):
    # acc is [BLOCK_H, D] fp32 in registers: 16 heads a program at V4's D = 512, with key tiles of 16 rows. At D 512
    # ptxas (sm_90a, bench/sm90_static.py) gives BLOCK_N 16 x 4 warps 241 registers and no spills (2 programs per
    # SM); BLOCK_N 32 x 4 warps spilled 256 bytes a thread. Not yet timed on a GPU: `tune: auto` times the grid.
    wide = d > 128
    defaults = {"BLOCK_H": max(16, min(next_pow2(heads), 16 if wide else 64)), "BLOCK_N": 16 if wide else 32,
                "num_warps": 4, "num_stages": 2, "SPLIT_KV": 0, "DOT": "auto", "SUM_IN_KERNEL": "auto",
                "ENCODE_IN_KERNEL": "auto", "V_SPLIT": 1, "QK_CHUNK": 0}
    cfg = launch_config(config, defaults, "attention", at_least={"BLOCK_H": 16, "BLOCK_N": 16})  # tl.dot tiles
    check(cfg["DOT"] in DOT_PRECISIONS,
          f"attention: config['DOT']: expected one of {list(DOT_PRECISIONS)}, got {cfg['DOT']!r}")
    # V_SPLIT: programs that each accumulate 1 / V_SPLIT of the output channels (the kernel's VP), so a program's
    # [BLOCK_H, D / V_SPLIT] accumulator leaves room for more heads (BLOCK_H 64 at D 512: every head of V4-Flash
    # in one program, each key read by V_SPLIT programs instead of H / 16). Not yet timed on a GPU.
    parts, block_d = cfg["V_SPLIT"], max(16, next_pow2(d))
    check(parts in (1, 2, 4), f"attention: config['V_SPLIT']: expected 1, 2 or 4, got {parts!r}")
    check(block_d // parts >= 16, f"attention: config['V_SPLIT'] {parts}: parts of {block_d // parts} channels, "
          f"under the 16 a tl.dot tile needs (head dim {d})")
    # QK_CHUNK: the scores summed over chunks of this many channels, the queries read a chunk at a time (0: whole)
    chunk = cfg["QK_CHUNK"]
    check(chunk == 0 or (isinstance(chunk, int) and chunk >= 16 and chunk & (chunk - 1) == 0),
          f"attention: config['QK_CHUNK']: expected 0 (whole rows) or a power of two >= 16, got {chunk!r}")
    return cfg


# "auto": bf16 tensor-core dots on a GPU, fp32 in the interpreter (which computes any dot in fp32). At d 512 and
# 64 heads a decode step does ~220 flops per KV byte, which fp32 FMA units cannot keep up with at memory speed.
# bf16 rather than tf32: a bf16 key tile takes half the registers of an fp32 one (with tf32 the kernel took
# ~150 us per [32, 512] key tile on an H100, far more than its memory traffic; compiled offline for sm_90a it
# spilled ~3.6 KB a thread, bench/results/sm90_static_before.json; not yet profiled on a GPU), and it is the
# precision of DeepSeek's own decode kernels (FlashMLA: bf16 queries and probabilities, fp32 accumulation).
# fp8_split and bf16 keys are exact in bf16; "tf32" and "ieee" stay available for a closer match to the fp32
# reference.
DOT_PRECISIONS = ("auto", "ieee", "tf32", "bf16")


def _tiles(cfg, block_d: int, d: int, kv_format: str, half: int) -> tuple[int, int]:
    """-> (value parts, score chunk) of the config, with the needs that depend on the call: fp8_split parts and
    chunks that start at a scale group (64 channels), and the output RoPE channels (the last 2 * half) inside the
    last part, which ropes them."""
    parts, chunk = cfg["V_SPLIT"], min(cfg["QK_CHUNK"] or block_d, block_d)
    width = block_d // parts
    for key, what, size in (("V_SPLIT", "parts", width), ("QK_CHUNK", "chunks", chunk)):
        check(kv_format != "fp8_split" or size == block_d or size % 64 == 0, f"attention: config['{key}'] "
              f"{cfg[key]}: fp8_split keys need {what} of a multiple of 64 channels (one UE8M0 scale each), got "
              f"{size} (head dim {d})")
    check(d - 2 * half >= (parts - 1) * width, f"attention: config['V_SPLIT'] {parts}: the output RoPE channels "
          f"[{d - 2 * half}, {d}) must lie in the last part [{(parts - 1) * width}, {parts * width})")
    return parts, chunk


def _dot_precision(cfg, device) -> str:
    if cfg["DOT"] == "auto":  # bf16 where the hardware casts and dots are used (a GPU), not in the interpreter
        return "bf16" if native_cvt(device) else "ieee"
    return cfg["DOT"]


MIN_KEYS_PER_SPLIT = 64
# ENCODE_IN_KERNEL: every program of a batch row encodes all its new keys, so only for a few (decode, a short
# speculative step): S rows of D each, against the >= MIN_KEYS_PER_SPLIT keys a program reads
ENCODE_MAX_TOKENS = 4


def _split_kv(cfg, device, programs: int, max_keys: int) -> tuple[int, int]:
    """-> (runs, keys per run, a multiple of BLOCK_N). SPLIT_KV if set; else enough runs of >= 64 keys to
    give every SM two programs when (query, batch row, head block) programs alone do not (1 off a GPU)."""
    split = cfg["SPLIT_KV"] or max(1, min(-(-2 * sm_count(device) // programs), max_keys // MIN_KEYS_PER_SPLIT))
    per = cdiv(cdiv(max_keys, split), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    return cdiv(max_keys, per), per


def _entry_source(state, selected, batch, s, pos0, rate, fmt, width):
    """-> (mode, entry rows, selected or None, rows per batch). CSA: the kernel reads selected[b, s, k] (-1 =
    none) as row b * capacity + selected of the entries viewed as [B * capacity, W]; a tiered store gathers the
    picks on the host into rows [B * S * K, W] (CSA_GATHERED): the kernel reads the pick's own row
    (b * S + s) * K + k. HCA: the first (pos0 + S) // rate rows of each batch row's entries (pos0 None, a
    device position: the kernel bounds them)."""
    if len(state) == 1:
        return SLIDING, None, None, 0
    entries = state[1]
    if selected is not None:
        if isinstance(entries, torch.Tensor):
            return CSA, entries, selected.contiguous(), entries.shape[1]
        check(pos0 is not None, "pos0: a device position needs the entries as a tensor, not a tiered store (whose "
                                "picks are gathered on the host)")
        rows = entries.gather(selected.long())  # [B, S, K, W]
        check(rows.dtype == STORAGE_DTYPES[fmt] and rows.shape[-1] == width,
              f"gathered entries: expected {STORAGE_DTYPES[fmt]} rows of {width}, got {rows.dtype} {list(rows.shape)}")
        return CSA_GATHERED, rows.reshape(-1, width).contiguous(), selected.contiguous(), 0
    if pos0 is None:
        check(isinstance(entries, torch.Tensor), "pos0: a device position needs the entries as a tensor, not a "
                                                 "tiered store (which reads the entries written so far on the host)")
        return HCA, entries, None, entries.shape[1]
    n_entries = (pos0 + s) // rate
    if not isinstance(entries, torch.Tensor):
        entries = entries.read(n_entries).contiguous()
        _check_entries("entries read", entries, batch, fmt, width)
    check(entries.shape[1] >= n_entries, f"state[1] (entries): {n_entries} closed windows but capacity {entries.shape[1]}")
    return HCA, entries, None, entries.shape[1]


def _write_ring(ring, stored, pos0):
    """The ring keeps the last window-1 tokens: position p in row p % (window - 1). The new rows land in at
    most two runs of ring rows (the ring wraps once at most): slices, not an index tensor; at a device
    position, `_ring_kernel`."""
    slots, s = ring.shape[1], stored.shape[1]
    if slots and isinstance(pos0, torch.Tensor):
        batch, _, width = stored.shape
        _ring_kernel[(s, batch)](storage_view(stored), storage_view(ring), pos0, s, slots, W=width,
                                 BLOCK_W=next_pow2(width))
    elif slots:
        n = min(s, slots)
        start = (pos0 + s - n) % slots
        first = min(n, slots - start)
        ring[:, start:start + first] = stored[:, s - n:s - n + first]
        if first < n:
            ring[:, :n - first] = stored[:, s - n + first:]


def _attend(q, kv, sinks, selected, state, pos0, window, rate, scale, kv_format, rope_dim, config, into, out_rope,
            in_norm=None):
    """q: [B, S, H, D] roped queries, kv: [B, S, D] roped keys (= values) of the new tokens, sinks: [H],
    selected: [B, S, K] entry indices (-1 = none) or None; state: (ring [B, window-1, W],) or
    (ring, entries [B, T, W] or a tiered store), stored in `kv_format` with `rope_dim` RoPE channels.
    -> [B, S, H, D] fp32. The ring is updated in place after attention. pos0: an int, or a device position
    (common.position): the launches are then the same at every position, the key runs of a split sized
    for the most keys a query can have (window - 1 + S, plus top-k or the HCA entries' capacity).
    out_rope: None, or attention_rope's (positions, inv_freq, inverse, rope scale): the output roped in the
    kernel. in_norm (with out_rope): None, or norm_attention_rope's (kv norm weight, q's rms_norm_rope attributes,
    kv's): q and kv are then the raw queries and keys, normed and roped at out_rope's positions and inv_freq by the
    kernel (kv from ENCODE_MAX_TOKENS + 1 new tokens on by the rms_norm_rope kernel first)."""
    _check_inputs(q, kv, sinks, selected, state, window, rate, kv_format, rope_dim)
    host_pos = position(pos0, q.device)
    q, kv, sinks = q.contiguous(), kv.contiguous(), sinks.contiguous()  # inputs may be views; state may not
    batch, s, heads, d = q.shape
    cfg = _config(config, heads, d)
    ring = state[0]
    slots = ring.shape[1]
    width = entry_layout(kv_format, d, rope_dim)[1]
    # the new keys' storage rows [B, S, W]: encoded by the attention kernel's programs (ENCODE_IN_KERNEL, one launch
    # less), or by the encode kernel
    encode = batch * s > 0 and config_switch("ENCODE_IN_KERNEL", cfg["ENCODE_IN_KERNEL"], [
        (s <= ENCODE_MAX_TOKENS, f"at most {ENCODE_MAX_TOKENS} new tokens a call (here {s})")], "attention")
    kv_weight, q_norm, kv_norm = in_norm or (None, None, None)
    if kv_norm is not None and not encode:
        kv, kv_norm = rms_norm_rope(kv, out_rope[0], out_rope[1], kv_weight, **kv_norm), None
    stored = storage_for(kv, kv_format, rope_dim) if encode else encode_kv(kv, kv_format, rope_dim)
    mode, entries, table, ent_stride = _entry_source(state, selected, batch, s, host_pos, rate, kv_format, width)
    k = table.shape[-1] if table is not None else 0
    out = result(into, (batch, s, heads, d), torch.float32, q.device)
    if batch * s:
        if host_pos is None:  # the most any position has
            n_entries = k if mode in (CSA, CSA_GATHERED) else ent_stride if mode == HCA else 0
            n_keys = min(window, slots + s) + n_entries
        else:
            n_entries = k if mode in (CSA, CSA_GATHERED) else (host_pos + s) // max(rate, 1) if mode == HCA else 0
            n_keys = min(window, host_pos + s) + n_entries
        h_blocks, block_d = cdiv(heads, cfg["BLOCK_H"]), max(16, next_pow2(d))
        parts, chunk = _tiles(cfg, block_d, d, kv_format, out_rope[1].shape[0] if out_rope else 0)
        split, per = _split_kv(cfg, q.device, s * batch * h_blocks * parts, n_keys)
        # finished in-kernel (SUM_IN_KERNEL): the split runs merged and the ring written by the last program to
        # arrive, two launches less (a counter per (token, head block) when split, then one per batch row)
        counters = in_kernel_counters(cfg["SUM_IN_KERNEL"], q.device, (split > 1) * batch * s * h_blocks + batch,
                                      "attention") if split > 1 or slots else None
        part, ml = out, out
        if split > 1:
            part = torch.empty(split, batch, s, heads, d, dtype=torch.float32, device=q.device)
            ml = torch.empty(2, split, batch, s, heads, dtype=torch.float32, device=q.device)
        new = storage_view(stored)
        blocks = encode_blocks(d, rope_dim)
        dot = _dot_precision(cfg, q.device)
        rpos, inv, inverse, rope_scale = out_rope or (new, new, False, 1.0)
        half = inv.shape[0] if out_rope else 0
        q_n, kv_n = q_norm or {}, kv_norm or {}
        _attention_kernel[(h_blocks * parts * split, s, batch)](
            q, kv, storage_view(ring) if slots else new, new, storage_view(entries) if entries is not None else new,
            table if table is not None else new, sinks, part, ml, out, counters if counters is not None else new,
            pos0 if host_pos is None else new, rpos, inv,
            torch.empty(q.shape, dtype=torch.float32, device=q.device) if q_norm else new,
            torch.empty(kv.shape, dtype=torch.float32, device=q.device) if kv_norm else new,
            kv_weight if kv_norm else new, s, heads, k, host_pos or 0, slots, max(slots, 1), window, max(rate, 1),
            ent_stride, float(scale), per, float(rope_scale), float(q_n.get("eps", 0.0)), float(q_n.get("scale", 1.0)),
            float(kv_n.get("eps", 0.0)), float(kv_n.get("scale", 1.0)), D=d, NOPE=d - rope_dim, ROPE=rope_dim,
            W=width, MODE=mode, FMT=FORMATS[kv_format], SPLIT=split, DOT=dot,
            KDT=tl.bfloat16 if dot == "bf16" else tl.float32, NATIVE=native_cvt(q.device),
            DEVICE_POS=host_pos is None, IN_KERNEL=counters is not None, RING=counters is not None and slots > 0,
            OUT_ROPE=out_rope is not None, HALF=half, INVERSE=bool(inverse), ENCODE=encode, VP=parts, QC=chunk,
            BLOCK_H=cfg["BLOCK_H"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d, BLOCK_W=next_pow2(width),
            BLOCK_HALF=next_pow2(max(half, 1)),
            BLOCK_G=blocks["BLOCK_G"], BLOCK_R=blocks["BLOCK_R"], Q_NORM=q_norm is not None,
            KV_NORM=kv_norm is not None, Q_INV=bool(q_n.get("inverse", False)), KV_INV=bool(kv_n.get("inverse", False)),
            BLOCK_NOPE=next_pow2(d - 2 * half), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        if split > 1 and counters is None:
            rows = batch * s * heads
            block_r = 16
            _combine_kernel[(cdiv(rows, block_r),)](part, ml, out, rpos, inv, rows, d, s, heads, float(rope_scale),
                                                    SPLIT=split, OUT_ROPE=out_rope is not None, HALF=half,
                                                    INVERSE=bool(inverse), BLOCK_R=block_r,
                                                    BLOCK_D=block_d, BLOCK_HALF=next_pow2(max(half, 1)))
        if counters is not None:
            return out  # the kernel wrote the ring too
    _write_ring(ring, stored, pos0)
    return out


def attention(q, kv, sinks, selected=None, *, state, pos0, window, rate=0, scale, kv_format="f32", rope_dim=0,
              config=None, into=None):
    """_attend without the output RoPE (see there)."""
    return _attend(q, kv, sinks, selected, state, pos0, window, rate, scale, kv_format, rope_dim, config, into, None)


attention.device_position = True  # takes pos0 as a device tensor (common.position)
LAUNCHERS = {"attention": attention}

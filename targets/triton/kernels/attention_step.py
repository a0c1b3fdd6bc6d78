"""The attention kernel's key-tile step (kernels/attention.py): decode a tile of keys, score it against the
queries (whole, or summed over chunks of channels), and fold it into the running softmax."""

import triton
import triton.language as tl

from .common import dot_bf16, to_bf16
from .kv_codec import load_rows


@triton.jit
def _online_step(s, v, ok, scale, m_i, l_i, acc, DOT: tl.constexpr, NATIVE: tl.constexpr):
    """Fold the scores s = q k^T [BH, BN] of keys ok [BN], with values v [BN, BV] (the keys, or this program's part
    of their channels), into the running softmax:
    s *= scale; m' = max(m, max s); l' = l e^(m-m') + sum e^(s-m'); acc' = acc e^(m-m') + e^(s-m') v.
    While nothing is seen (m' = -inf: a split's first masked tile, or a -inf sink) the exponents are taken
    against 0, so l and acc stay 0 instead of NaN. DOT "bf16": the probabilities are rounded to bf16 for the dot;
    it accumulates in fp32."""
    s = tl.where(ok[None, :], s * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_ref)
    p = tl.exp(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DOT == "bf16":
        acc = acc * alpha[:, None] + dot_bf16(to_bf16(p, NATIVE), v, NATIVE)
    else:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT)
    return m_new, l_i, acc


@triton.jit
def _dot_qk(q, k, DOT: tl.constexpr, NATIVE: tl.constexpr):
    """q [BH, C] . k [BN, C]^T in fp32 (for "bf16", q and k are bf16 already)."""
    if DOT == "bf16":
        s = dot_bf16(q, tl.trans(k), NATIVE)
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT)
    return s


@triton.jit
def _fold_keys(q, q_rows, q_ok, rows, ok, v0, scale, m_i, l_i, acc, D: tl.constexpr, NOPE: tl.constexpr,
               ROPE: tl.constexpr, FMT: tl.constexpr, KDT: tl.constexpr, NATIVE: tl.constexpr, DOT: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, QC: tl.constexpr, CACHE: tl.constexpr,
               Q_CACHE: tl.constexpr):
    """One key tile (storage rows `rows` [BN], ok [BN]) folded into the running softmax (_online_step). QC == BLOCK_D:
    the whole key rows decoded once, dotted with q [BH, BD] (held by the program), and their value channels
    [v0, v0 + BLOCK_V) taken from them (or decoded again for a part). QC < BLOCK_D: the scores summed over chunks
    of QC channels, each chunk of the query rows q_rows [BH] (pointers; read with Q_CACHE, not q_ok read as 0) and
    of the keys loaded in turn, so the program holds [BH, QC] of the queries instead of [BH, BD] (at D 512 and 16
    heads a whole bf16 q is 128 registers a thread); the value channels are decoded on their own."""
    if QC == BLOCK_D:
        k = load_rows(rows, ok, D, NOPE, ROPE, FMT, KDT, NATIVE, BLOCK_D, CACHE)
        s = _dot_qk(q, k, DOT, NATIVE)
    else:
        s = tl.zeros([q_rows.shape[0], rows.shape[0]], dtype=tl.float32)
        for c in tl.static_range(BLOCK_D // QC):
            offs = c * QC + tl.arange(0, QC)
            qc = tl.load(q_rows[:, None] + offs[None, :], mask=q_ok[:, None] & (offs[None, :] < D), other=0.0,
                         cache_modifier=Q_CACHE).to(tl.float32)
            if DOT == "bf16":
                qc = to_bf16(qc, NATIVE)
            kc = load_rows(rows, ok, D, NOPE, ROPE, FMT, KDT, NATIVE, QC, CACHE, c * QC, BLOCK_D)
            s += _dot_qk(qc, kc, DOT, NATIVE)
    if QC == BLOCK_D and BLOCK_V == BLOCK_D:
        v = k
    else:
        v = load_rows(rows, ok, D, NOPE, ROPE, FMT, KDT, NATIVE, BLOCK_V, CACHE, v0, BLOCK_D)
    return _online_step(s, v, ok, scale, m_i, l_i, acc, DOT, NATIVE)

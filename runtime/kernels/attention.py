"""Shared-KV attention with sinks over a sliding window plus compressed entries, and the
Lightning Indexer's top-k selection.

A query at position t sees window keys at positions (t - window, t], and compressed entries
w < (t + 1) // rate: all of them (HCA) or the ones the indexer selected (CSA). K = V; one KV head
is shared by all query heads. Each head has a learned sink logit that takes part in the softmax
and is then dropped.

The ring state [B, window-1, ...] holds the roped KV of the last window-1 tokens (in the layer's
KV format); position p lives in row p % (window - 1).
"""

import torch

from ..quant import decode_entries, encode_entries
from .basic import rms_norm_rope, rope
from .entries import gather_rows, read_rows
from .moe import select_topk

NEG_INF = float("-inf")


def _window_keys(ring, kv, pos0, fmt, rope):
    """Keys visible to this call, oldest first: the ring's tokens then the new ones, all as stored
    in `fmt` (so a token's own key reads the same in prefill and in decode).
    ring: [B, W-1, ...], kv: [B, S, D] -> keys [B, n, D], positions [n]; and the new keys' storage."""
    slots, d = ring.shape[1], kv.shape[-1]
    n_old = min(pos0, slots)
    old_pos = torch.arange(pos0 - n_old, pos0, device=kv.device)
    stored = encode_entries(kv, fmt, rope)
    old = decode_entries(ring[:, old_pos % slots], fmt, d, rope)
    keys = torch.cat([old, decode_entries(stored, fmt, d, rope)], dim=1)
    return keys, torch.cat([old_pos, torch.arange(pos0, pos0 + kv.shape[1], device=kv.device)]), stored


def _write_ring(ring, stored, pos0):
    slots, s = ring.shape[1], stored.shape[1]
    if slots:
        n = min(s, slots)
        ring[:, torch.arange(pos0 + s - n, pos0 + s, device=ring.device) % slots] = stored[:, s - n:]


def attention_rope(q, kv, sinks, positions, inv_freq, selected=None, *, state, pos0, window, rate=0, scale,
                   kv_format="f32", rope_dim=0, out_rope):
    """rope(attention(..), positions, inv_freq, **out_rope): the fuse pass's one op for an attention read only by a
    RoPE (V4's inverse RoPE of the attention output); out_rope: the rope's attributes {inverse?, scale?}."""
    out = attention(q, kv, sinks, selected, state=state, pos0=pos0, window=window, rate=rate, scale=scale,
                    kv_format=kv_format, rope_dim=rope_dim)
    return rope(out, positions, inv_freq, **out_rope)


def norm_attention_rope(q, kv, kv_weight, sinks, positions, inv_freq, selected=None, *, state, pos0, window, rate=0,
                        scale, kv_format="f32", rope_dim=0, out_rope, q_norm, kv_norm):
    """attention_rope(rms_norm_rope(q, ..), rms_norm_rope(kv, .., kv_weight), ..): the fuse pass's one op for an
    attention_rope whose queries and keys each come from an rms_norm_rope at its positions and inv_freq (V4's
    weightless per-head query norm and kv_norm, each before its RoPE). q_norm, kv_norm: those ops' attributes
    {eps, inverse?, scale?}."""
    q = rms_norm_rope(q, positions, inv_freq, **q_norm)
    kv = rms_norm_rope(kv, positions, inv_freq, kv_weight, **kv_norm)
    return attention_rope(q, kv, sinks, positions, inv_freq, selected, state=state, pos0=pos0, window=window,
                          rate=rate, scale=scale, kv_format=kv_format, rope_dim=rope_dim, out_rope=out_rope)


def attention(q, kv, sinks, selected=None, *, state, pos0, window, rate=0, scale, kv_format="f32", rope_dim=0):
    """q: [B, S, H, D] roped queries, kv: [B, S, D] roped keys (= values) of the new tokens,
    sinks: [H], selected: [B, S, K] entry indices from `index_topk` (-1 = none) or None.
    state: (ring,) for sliding layers, (ring, entries) for CSA / HCA, both stored in `kv_format`
    with `rope_dim` RoPE channels. -> [B, S, H, D].

    Logits over [window keys | compressed entries | sink]: CSA gathers each query's selected
    entries (so only those are read, on whatever tier they live); HCA reads every closed window."""
    batch, s, heads, d = q.shape
    keys, key_pos, stored = _window_keys(state[0], kv, pos0, kv_format, rope_dim)
    q_pos = torch.arange(pos0, pos0 + s, device=q.device)
    visible = (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] > q_pos[:, None] - window)
    qh = q.float().transpose(1, 2)  # [B, H, S, D]
    logits = torch.matmul(qh, keys.unsqueeze(1).transpose(2, 3)) * scale  # [B, H, S, n]
    logits = logits.masked_fill(~visible, NEG_INF)
    entries = None
    if len(state) > 1 and selected is not None:  # CSA: the indexer's picks, per query
        entries = decode_entries(gather_rows(state[1], selected), kv_format, d, rope_dim)  # [B, S, K, D]
        e_logits = torch.einsum("bhsd,bskd->bhsk", qh, entries) * scale
        e_logits = e_logits.masked_fill((selected < 0).unsqueeze(1), NEG_INF)
    elif len(state) > 1:  # HCA: every closed window, causally
        n_entries = (pos0 + s) // rate
        entries = decode_entries(read_rows(state[1], n_entries), kv_format, d, rope_dim)  # [B, T, D]
        e_logits = torch.matmul(qh, entries.unsqueeze(1).transpose(2, 3)) * scale
        causal = torch.arange(n_entries, device=q.device)[None, :] < ((q_pos + 1) // rate)[:, None]
        e_logits = e_logits.masked_fill(~causal, NEG_INF)
    parts = [logits] if entries is None else [logits, e_logits]
    sink = sinks.float().view(1, heads, 1, 1).expand(batch, heads, s, 1)
    logits = torch.cat(parts + [sink], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1)
    n = keys.shape[1]
    out = torch.matmul(probs[..., :n], keys.unsqueeze(1))  # [B, H, S, D]
    if entries is not None and selected is not None:
        out = out + torch.einsum("bhsk,bskd->bhsd", probs[..., n:-1], entries)
    elif entries is not None:
        out = out + torch.matmul(probs[..., n:-1], entries.unsqueeze(1))
    _write_ring(state[0], stored, pos0)
    return out.transpose(1, 2).contiguous()


def index_scores(q, weights, keys, *, score_scale, weight_scale):
    """Lightning Indexer score sum_h w[h] * relu(q[h] . k) * score_scale.
    q: [B, S, H, Di], weights: [B, S, H], keys: [B, T, Di] -> [B, S, T]."""
    scores = torch.relu(torch.matmul(q.float(), keys.float().transpose(-1, -2).unsqueeze(1))) * score_scale
    return (scores * (weights.float() * weight_scale).unsqueeze(-1)).sum(dim=2)


def rope_index_topk(q, weights, positions, inv_freq, *, state, pos0, topk, rate, score_scale, weight_scale,
                    key_format="f32", q_rope):
    """index_topk(rope(q, positions, inv_freq, **q_rope), ..): the fuse pass's one op for the indexer's queries
    roped only for it; q_rope: the rope's attributes {inverse?, scale?}."""
    return index_topk(rope(q, positions, inv_freq, **q_rope), weights, state=state, pos0=pos0, topk=topk, rate=rate,
                      score_scale=score_scale, weight_scale=weight_scale, key_format=key_format)


def index_topk(q, weights, *, state, pos0, topk, rate, score_scale, weight_scale, key_format="f32"):
    """Pick up to `topk` causal compressed entries per query by indexer score.
    q: [B, S, H, Di] roped indexer queries, weights: [B, S, H]; state: (indexer keys [B, T, ...] in
    `key_format`,).
    -> [B, S, topk] int64 entry indices, best first; ties go to the lower index; -1 pads."""
    batch, s = q.shape[:2]
    out = torch.full((batch, s, topk), -1, dtype=torch.long, device=q.device)
    n_entries = (pos0 + s) // rate
    if n_entries == 0:
        return out
    keys = decode_entries(read_rows(state[0], n_entries), key_format, q.shape[-1], 0)
    scores = index_scores(q, weights, keys, score_scale=score_scale, weight_scale=weight_scale)
    limit = ((torch.arange(pos0, pos0 + s, device=q.device) + 1) // rate)[None, :, None]  # entries < limit are causal
    scores = scores.masked_fill(torch.arange(n_entries, device=q.device)[None, None, :] >= limit, NEG_INF)
    k = min(topk, n_entries)
    picks = select_topk(scores, k)
    out[..., :k] = torch.where(picks >= limit, -1, picks)
    return out

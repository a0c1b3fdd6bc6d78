"""Shared-KV attention with sinks over a sliding window plus compressed entries, and the
Lightning Indexer's top-k selection.

A query at position t sees window keys at positions (t - window, t], and compressed entries
w < (t + 1) // rate: all of them (HCA) or the ones the indexer selected (CSA). K = V; one KV head
is shared by all query heads. Each head has a learned sink logit that takes part in the softmax
and is then dropped.

The ring state [B, window-1, D] holds the roped KV of the last window-1 tokens; position p lives
in row p % (window - 1).
"""

import torch

from ..quant import decode_entries
from .moe import select_topk

NEG_INF = float("-inf")


def _window_keys(ring, kv, pos0):
    """Keys visible to this call, oldest first: the ring's tokens then the new ones.
    ring: [B, W-1, D], kv: [B, S, D] -> keys [B, n, D], positions [n]."""
    slots = ring.shape[1]
    n_old = min(pos0, slots)
    old_pos = torch.arange(pos0 - n_old, pos0)
    keys = torch.cat([ring[:, old_pos % slots] if slots else ring, kv.float()], dim=1)
    return keys, torch.cat([old_pos, torch.arange(pos0, pos0 + kv.shape[1])])


def _write_ring(ring, kv, pos0):
    slots, s = ring.shape[1], kv.shape[1]
    if slots:
        n = min(s, slots)
        ring[:, torch.arange(pos0 + s - n, pos0 + s) % slots] = kv[:, s - n:].float()


def attention(q, kv, sinks, selected=None, *, state, pos0, window, rate=0, scale, kv_format="f32", rope_dim=0):
    """q: [B, S, H, D] roped queries, kv: [B, S, D] roped keys (= values) of the new tokens,
    sinks: [H], selected: [B, S, K] entry indices from `index_topk` (-1 = none) or None.
    state: (ring,) for sliding layers, (ring, entries) for CSA / HCA, entries stored in
    `kv_format` with `rope_dim` RoPE channels. -> [B, S, H, D]."""
    batch, s, heads, _ = q.shape
    keys, key_pos = _window_keys(state[0], kv, pos0)
    q_pos = torch.arange(pos0, pos0 + s)
    visible = (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] > q_pos[:, None] - window)
    bias = torch.zeros(s, keys.shape[1]).masked_fill(~visible, NEG_INF).expand(batch, s, -1)
    if len(state) > 1:
        n_entries = (pos0 + s) // rate
        entries = decode_entries(state[1][:, :n_entries], kv_format, q.shape[-1], rope_dim)
        if selected is None:  # HCA: every closed window
            causal = torch.arange(n_entries)[None, :] < ((q_pos + 1) // rate)[:, None]
            entry_bias = torch.zeros(s, n_entries).masked_fill(~causal, NEG_INF).expand(batch, s, -1)
        else:  # CSA: only the indexer's picks
            safe = torch.where(selected >= 0, selected, n_entries)
            entry_bias = torch.full((batch, s, n_entries + 1), NEG_INF).scatter_(-1, safe, 0.0)[..., :n_entries]
        keys = torch.cat([keys, entries], dim=1)
        bias = torch.cat([bias, entry_bias], dim=-1)
    q = q.float().transpose(1, 2)  # [B, H, S, D]
    logits = torch.matmul(q, keys.unsqueeze(1).transpose(2, 3)) * scale + bias.unsqueeze(1)
    logits = torch.cat([logits, sinks.float().view(1, heads, 1, 1).expand(batch, heads, s, 1)], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1)[..., :-1]
    out = torch.matmul(probs, keys.unsqueeze(1)).transpose(1, 2)  # [B, S, H, D]
    _write_ring(state[0], kv, pos0)
    return out.contiguous()


def index_scores(q, weights, keys, *, score_scale, weight_scale):
    """Lightning Indexer score sum_h w[h] * relu(q[h] . k) * score_scale.
    q: [B, S, H, Di], weights: [B, S, H], keys: [B, T, Di] -> [B, S, T]."""
    scores = torch.relu(torch.matmul(q.float(), keys.float().transpose(-1, -2).unsqueeze(1))) * score_scale
    return (scores * (weights.float() * weight_scale).unsqueeze(-1)).sum(dim=2)


def index_topk(q, weights, *, state, pos0, topk, rate, score_scale, weight_scale):
    """Pick up to `topk` causal compressed entries per query by indexer score.
    q: [B, S, H, Di] roped indexer queries, weights: [B, S, H]; state: (indexer keys [B, T, Di],).
    -> [B, S, topk] int64 entry indices, best first; ties go to the lower index; -1 pads."""
    batch, s = q.shape[:2]
    out = torch.full((batch, s, topk), -1, dtype=torch.long)
    n_entries = (pos0 + s) // rate
    if n_entries == 0:
        return out
    scores = index_scores(q, weights, state[0][:, :n_entries], score_scale=score_scale, weight_scale=weight_scale)
    limit = ((torch.arange(pos0, pos0 + s) + 1) // rate)[None, :, None]  # entries < limit are causal
    scores = scores.masked_fill(torch.arange(n_entries)[None, None, :] >= limit, NEG_INF)
    k = min(topk, n_entries)
    picks = select_topk(scores, k)
    out[..., :k] = torch.where(picks >= limit, -1, picks)
    return out

"""KV compressor: pools every `rate` tokens into one compressed entry (CSA, HCA, indexer keys).

Entry w pools the tokens of window w = [w*rate, (w+1)*rate) with a softmax gate per channel:
    entry_w = rope(rms_norm(sum_j softmax_j(gate_j + ape_j) * kv_j), position w*rate).
With `overlap` (CSA and its indexer) each token projects to 2d channels, Ca = [:d] and Cb = [d:],
and entry w pools Ca of window w-1 together with Cb of window w (width 2*rate, stride rate).

State (fixed capacity, fill levels follow from the session position `pos0`):
    buf_kv, buf_gate: [B, rate, C]  raw projections of the pos0 % rate tokens of the open window
    ovl_kv, ovl_gate: [B, rate, d]  Ca of the last closed window, gate with `ape` added (overlap only)
    entries:          [B, T, ...]   closed windows, stored in `kv_format` (f32, bf16 or fp8_split, see
                                    quant.encode_entries); the first pos0 // rate rows are valid
"""

import torch

from ..quant import encode_entries
from .basic import apply_rope, rms_norm, rope_cos_sin
from .entries import write_rows


def compress(kv, gate, ape, norm_weight, inv_freq, *, state, pos0, rate, overlap, eps, rope_scale=1.0,
             kv_format="f32"):
    """kv, gate: [B, S, C] projections of the new tokens; ape: [rate, C]; writes new entries."""
    if overlap:
        buf_kv, buf_gate, ovl_kv, ovl_gate, entries = state
    else:
        buf_kv, buf_gate, entries = state
    batch, _, width = kv.shape
    n_buf = pos0 % rate
    kv = torch.cat([buf_kv[:, :n_buf], kv.float()], dim=1)  # [B, n_buf + S, C]
    gate = torch.cat([buf_gate[:, :n_buf], gate.float()], dim=1)
    n_win = kv.shape[1] // rate
    used = n_win * rate
    rest = kv.shape[1] - used
    if n_win == 0:
        buf_kv[:, :rest] = kv
        buf_gate[:, :rest] = gate
        return
    first_entry = pos0 // rate
    win_kv = kv[:, :used].view(batch, n_win, rate, width)
    win_gate = gate[:, :used].view(batch, n_win, rate, width) + ape.float()
    if overlap:
        d = width // 2
        pooled_kv = win_kv.new_zeros(batch, n_win, 2 * rate, d)
        pooled_gate = win_gate.new_full((batch, n_win, 2 * rate, d), float("-inf"))
        pooled_kv[:, :, rate:] = win_kv[..., d:]  # Cb of this window
        pooled_gate[:, :, rate:] = win_gate[..., d:]
        pooled_kv[:, 1:, :rate] = win_kv[:, :-1, :, :d]  # Ca of the previous window
        pooled_gate[:, 1:, :rate] = win_gate[:, :-1, :, :d]
        if first_entry > 0:  # the previous window closed in an earlier call
            pooled_kv[:, 0, :rate] = ovl_kv
            pooled_gate[:, 0, :rate] = ovl_gate
        ovl_kv.copy_(win_kv[:, -1, :, :d])
        ovl_gate.copy_(win_gate[:, -1, :, :d])
        win_kv, win_gate = pooled_kv, pooled_gate
    pooled = (win_kv * win_gate.softmax(dim=2)).sum(dim=2)  # [B, n_win, d]
    pooled = rms_norm(pooled, norm_weight, eps=eps)
    positions = torch.arange(n_win, device=kv.device) * rate + first_entry * rate
    cos, sin = rope_cos_sin(positions, inv_freq, rope_scale)
    write_rows(entries, first_entry, encode_entries(apply_rope(pooled, cos, sin), kv_format, 2 * inv_freq.shape[0]))
    buf_kv[:, :rest] = kv[:, used:]
    buf_gate[:, :rest] = gate[:, used:]


def compress_pair(kv, gate, ape, norm_weight, inv_freq, kv2, gate2, ape2, norm_weight2, inv_freq2, *, state, pos0,
                  first, second):
    """compress(kv, .., **first) then compress(kv2, .., **second); state: the first's slots, then the second's
    (the triton lowering joins a CSA layer's two compressors into this op: one launch at a decode step)."""
    n = 5 if first["overlap"] else 3
    compress(kv, gate, ape, norm_weight, inv_freq, state=state[:n], pos0=pos0, **first)
    compress(kv2, gate2, ape2, norm_weight2, inv_freq2, state=state[n:], pos0=pos0, **second)

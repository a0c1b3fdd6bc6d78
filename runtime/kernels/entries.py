"""Access to compressed-entry state: a dense tensor [B, T, W], or a tiered store (`runtime.kv_tiers.PagedEntries`)
with the same three operations. Kernels use only these, so a store can live on any tier.

    write_rows(entries, start, rows)   rows [B, n, W] become entries start .. start+n-1
    read_rows(entries, n)              -> the first n entries [B, n, W]
    gather_rows(entries, idx)          idx [B, S, K] (-1: none) -> [B, S, K, W] (zeros where idx < 0)
"""

import torch


def write_rows(entries, start: int, rows: torch.Tensor) -> None:
    if isinstance(entries, torch.Tensor):
        entries[:, start:start + rows.shape[1]] = rows
    else:
        entries.write(start, rows)


def read_rows(entries, n: int) -> torch.Tensor:
    return entries[:, :n] if isinstance(entries, torch.Tensor) else entries.read(n)


def gather_rows(entries, idx: torch.Tensor) -> torch.Tensor:
    if not isinstance(entries, torch.Tensor):
        return entries.gather(idx)
    b = torch.arange(idx.shape[0], device=idx.device)[:, None, None]
    out = entries[b, idx.clamp(min=0)]  # [B, S, K, W]
    return out.masked_fill((idx < 0)[..., None], 0)

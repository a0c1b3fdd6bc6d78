"""Next-token logits for a token sequence, as one prefill or through the incremental state."""

import torch

from .errors import InputError
from .executor import Session


def score_tokens(session: Session, token_ids: list[int], chunk: int | None = None) -> torch.Tensor:
    """-> float32 [S, vocab] logits; position i predicts token i+1. With `chunk`, the sequence goes
    through the session `chunk` tokens at a time (1 = token by token)."""
    if chunk is not None and chunk < 1:
        raise InputError(f"--chunk {chunk}: must be at least 1")
    ids = torch.tensor([token_ids], dtype=torch.long)
    session.check_tokens(ids)  # whole-sequence checks before any state changes
    step = chunk or len(token_ids)
    parts = [session.forward(ids[:, i:i + step])[0].cpu() for i in range(0, len(token_ids), step)]
    return torch.cat(parts).float()

"""Token generation over a session: greedy, or sampled with temperature / top-k / top-p."""

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import InputError
from .executor import Session


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy (argmax; ties go to the lower id)
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise InputError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {self}")


def pick(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> int:
    """logits: [V] -> the next token id."""
    if s.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True, stable=True)
        drop = sorted_p.cumsum(0) - sorted_p >= s.top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(0, order[drop], 0.0)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def generate(session: Session, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
             stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
    """Feed `prompt`, then yield up to `max_new_tokens` ids as they are produced (stopping after
    a stop id). The session must be fresh or hold the context the prompt continues."""
    if not prompt:
        raise InputError("the prompt is empty: give at least one token")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens = {max_new_tokens}: must be at least 1")
    needed = len(prompt) + max_new_tokens - 1  # the last new token is not fed back
    if needed > session.remaining:
        raise InputError(f"the prompt ({len(prompt)} tokens) plus {max_new_tokens} new tokens needs {needed} "
                         f"positions, but the session has {session.remaining} left of the planned context of "
                         f"{session.program.max_context} (kv.max_context); shorten the prompt, ask for fewer "
                         "tokens, or recompile with a larger kv.max_context")
    gen = torch.Generator().manual_seed(sampling.seed)
    logits = session.forward(torch.tensor([prompt]))[0, -1].cpu()
    for i in range(max_new_tokens):
        token = pick(logits, sampling, gen)
        yield token
        if token in stop_ids or i + 1 == max_new_tokens:
            return
        logits = session.forward(torch.tensor([[token]]))[0, -1].cpu()

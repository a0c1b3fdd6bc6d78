"""How far every discrete choice of a run is from flipping.

Top-k selections (the Lightning Indexer's entries, the router's experts) are discontinuous: two
implementations that agree to 1e-6 can still pick differently when the k-th and (k+1)-th scores
are that close. A parity test is only meaningful when every selection it makes is unambiguous,
so parity tests assert that the smallest relative margin is well above float error.
"""

import torch

from v4c.runtime.kernels.attention import index_scores
from v4c.runtime.kernels.moe import SCORE_FUNCS


def _gap(scores: torch.Tensor, k: int) -> float:
    """Smallest relative gap between the k-th and (k+1)-th score over rows with more than k finite scores."""
    s = torch.sort(scores, dim=-1, descending=True).values
    finite = torch.isfinite(s).sum(-1)
    rows = finite > k
    if k < 1 or not rows.any():
        return float("inf")
    gap = (s[..., k - 1] - s[..., k])[rows]
    scale = s.masked_fill(~torch.isfinite(s), 0).abs().amax(-1)[rows].clamp(min=1e-12)
    return float((gap / scale).min())


def selection_margins(session, tokens: torch.Tensor) -> dict[str, float]:
    """Run `tokens` through `session` and return the smallest margin per kind of selection."""
    out = {"indexer": float("inf"), "router": float("inf")}

    def observe(i, step, inputs, outputs):
        if step.kernel == "index_topk":
            q, w = inputs
            keys = session.state[step.state[0]]
            rate, s = step.attrs["rate"], q.shape[1]
            n = (session.pos + s) // rate
            if n:
                scores = index_scores(q, w, keys[:, :n], score_scale=step.attrs["score_scale"],
                                      weight_scale=step.attrs["weight_scale"])
                limit = ((torch.arange(session.pos, session.pos + s) + 1) // rate)[None, :, None]
                scores = scores.masked_fill(torch.arange(n)[None, None, :] >= limit, float("-inf"))
                out["indexer"] = min(out["indexer"], _gap(scores, step.attrs["topk"]))
        elif step.kernel == "route_topk":
            x, weight, bias = inputs
            scores = SCORE_FUNCS[step.attrs["score_func"]](torch.nn.functional.linear(x.float(), weight.float()))
            out["router"] = min(out["router"], _gap(scores + bias.float(), step.attrs["k"]))

    session.forward(tokens, observer=observe)
    return out

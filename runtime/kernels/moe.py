"""Mixture of experts: the two routers (learned top-k, frozen hash table) and the routed experts."""

import torch
import torch.nn.functional as F

from .basic import swiglu

SCORE_FUNCS = {
    "sqrtsoftplus": lambda logits: F.softplus(logits).sqrt(),
    "sigmoid": torch.sigmoid,
    "softmax": lambda logits: logits.softmax(dim=-1),
}


def select_topk(scores, k):
    """Indices of the k largest scores along the last dim; equal scores go to the lower index.
    (torch.topk leaves the order of ties unspecified, which would make routing depend on the
    kernel; v4c defines it.)"""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def _normalised(scores, idx, scale):
    weights = scores.gather(-1, idx)
    return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * scale


def _with_shared(weights, idx, experts: int, shared: bool):
    """shared: one slot more, after the k chosen: expert `experts` (the shared expert, stacked after the routed
    ones), weight 1; the experts then add it last, as the model adds the shared expert's output to theirs."""
    if not shared:
        return weights, idx
    lead = weights.shape[:-1]
    return (torch.cat([weights, torch.ones(*lead, 1, dtype=weights.dtype, device=weights.device)], dim=-1),
            torch.cat([idx, torch.full((*lead, 1), experts, dtype=idx.dtype, device=idx.device)], dim=-1))


def route_topk(x, weight, bias, *, k, score_func, scale, shared=False):
    """x: [B, S, D], weight: [E, D], bias: [E] -> weights [B, S, k] (fp32), experts [B, S, k] (i64).
    Experts: top-k of score(x W^T) + bias; weights: their scores (without bias), renormalised, x scale.
    shared: k + 1 slots, the last expert E with weight 1 (`_with_shared`)."""
    scores = SCORE_FUNCS[score_func](F.linear(x.float(), weight.float()))
    idx = select_topk(scores + bias.float(), k)
    return _with_shared(_normalised(scores, idx, scale), idx, weight.shape[0], shared)


def route_hash(x, weight, table, tokens, *, score_func, scale, shared=False):
    """Hash routing: experts = table[token] (frozen), weights as in `route_topk` (shared likewise).
    x: [B, S, D], weight: [E, D], table: [V, k], tokens: [B, S]."""
    scores = SCORE_FUNCS[score_func](F.linear(x.float(), weight.float()))
    idx = table[tokens].long()
    return _with_shared(_normalised(scores, idx, scale), idx, weight.shape[0], shared)


def run_experts(x, weights, idx, expert, *, limit=None, quant_in=None, quant_mid=None):
    """sum_j weights[j] * down_e(swiglu(gate_up_e x)) over the selected experts e = idx[j].
    `expert(e)` -> (gate_up [2I, D], down [D, I]) in fp32; `quant_in` / `quant_mid` optionally
    quantize the activations entering each projection."""
    shape = x.shape
    x = x.float().reshape(-1, shape[-1])
    idx = idx.reshape(x.shape[0], -1)
    weights = weights.float().reshape(x.shape[0], -1)
    out = torch.zeros_like(x)
    for e in torch.unique(idx).tolist():  # ascending expert order, as the reference accumulates
        token, slot = torch.where(idx == e)
        gate_up, down = expert(e)
        xe = x[token] if quant_in is None else quant_in(x[token])
        gate, up = F.linear(xe, gate_up).chunk(2, dim=-1)
        mid = swiglu(gate, up, limit=limit)
        y = F.linear(mid if quant_mid is None else quant_mid(mid), down)
        out.index_add_(0, token, y * weights[token, slot, None])
    return out.view(shape)


def moe_experts(x, weights, idx, gate_up, down, *, limit=None, act_in=None, act_mid=None):
    """Routed experts. x: [B, S, D], weights/idx: [B, S, k], gate_up: [E, 2I, D], down: [E, D, I]
    -> [B, S, D] = sum_j weights[j] * down_e(swiglu(gate_up_e x)) with e = idx[j].
    `act_in` / `act_mid` (fake-quant reference path) quantize the activations entering each projection."""
    from ..quant import fake_quant_act
    return run_experts(x, weights, idx, lambda e: (gate_up[e].float(), down[e].float()), limit=limit,
                       quant_in=act_in and (lambda t: fake_quant_act(t, act_in)),
                       quant_mid=act_mid and (lambda t: fake_quant_act(t, act_mid)))

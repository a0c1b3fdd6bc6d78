"""Triton MoE routers, with the semantics of runtime/kernels/moe.py (route_topk, route_hash); fp32 math.

One kernel, grid (token tiles,): logits x W^T for BLOCK_M tokens x all E <= MAX_EXPERTS experts, the
score function, top-k of score + bias by k rounds of argmax (ties to the lower index, as select_topk)
or the hash-table lookup, and the chosen scores renormalised: w / (sum w + 1e-20) * scale.
"""

import torch
import triton
import triton.language as tl

from .common import (cdiv, check, check_tensor, host_values, launch_config, next_pow2, once, result, results,
                     same_device)

MAX_EXPERTS = 1024
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
INTS = (torch.int32, torch.int64)
SCORE_FUNCS = {"sqrtsoftplus": 0, "sigmoid": 1, "softmax": 2}
ROUTER_CONFIG = {"BLOCK_M": 16, "BLOCK_K": 32}


# --- kernel --------------------------------------------------------------------------------------
@triton.jit
def _router_kernel(x_ptr, w_ptr, b_ptr, tab_ptr, tokens_ptr, wout_ptr, iout_ptr, M, D, E, V, scale,
                   K: tl.constexpr, SCORE: tl.constexpr, HASH: tl.constexpr, SHARED: tl.constexpr,
                   BM: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr):
    """For BM tokens: scores = f(x W^T) [BM, BE]; experts = top-K of scores + bias (lower index on ties)
    or table[token]; weights = their scores / (sum + 1e-20) * scale -> wout [M, K] f32, iout [M, K] i64.
    SHARED: rows of K + 1, the last slot expert E (the shared expert) with weight 1.
    A token id outside the table's V rows reads no memory (its row is taken as expert 0's)."""
    m = tl.program_id(0) * BM + tl.arange(0, BM)
    mmask = m < M
    cols = tl.arange(0, BE)
    cmask = cols < E
    logits = tl.zeros([BM, BE], dtype=tl.float32)
    for k0 in range(0, D, BK):
        k = k0 + tl.arange(0, BK)
        a = tl.load(x_ptr + m.to(tl.int64)[:, None] * D + k[None, :], mask=mmask[:, None] & (k < D)[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * D + k[None, :], mask=cmask[:, None] & (k < D)[None, :], other=0.0)
        logits += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    if SCORE == 0:  # sqrt(softplus), softplus = x past 20, else log1p(exp(x)) (log1p via log(u) * y / (u - 1))
        y = tl.exp(tl.minimum(logits, 20.0))
        u = 1.0 + y
        log1p = tl.where(u == 1.0, y, tl.log(u) * (y / tl.where(u == 1.0, 1.0, u - 1.0)))
        scores = tl.sqrt_rn(tl.where(logits > 20.0, logits, log1p))
    elif SCORE == 1:
        scores = 1.0 / (1.0 + tl.exp(-logits))
    else:
        z = tl.where(cmask[None, :], logits, float("-inf"))
        z = tl.exp(z - tl.max(z, axis=1)[:, None])
        scores = z / tl.sum(z, axis=1)[:, None]
    kcol = tl.arange(0, KP)
    chosen = tl.zeros([BM, KP], dtype=tl.int32)
    picked = tl.zeros([BM, KP], dtype=tl.float32)
    if HASH:
        tok = tl.load(tokens_ptr + m, mask=mmask, other=0).to(tl.int64)
        tok_ok = mmask & (tok >= 0) & (tok < V)
    else:
        biased = scores + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        free = tl.zeros([BM, BE], dtype=tl.int32) + cmask[None, :].to(tl.int32)  # 1 = still selectable
    for j in tl.static_range(K):
        if HASH:
            sel = tl.load(tab_ptr + tok * K + j, mask=tok_ok, other=0).to(tl.int32)
        else:
            cand = tl.where(free != 0, biased, float("-inf"))
            best = tl.max(cand, axis=1)
            sel = tl.min(tl.where((free != 0) & (cand == best[:, None]), cols[None, :], BE), axis=1)
            free = tl.where(cols[None, :] == sel[:, None], 0, free)
        val = tl.sum(tl.where(cols[None, :] == sel[:, None], scores, 0.0), axis=1)
        chosen = tl.where(kcol[None, :] == j, sel[:, None], chosen)
        picked = tl.where(kcol[None, :] == j, val[:, None], picked)
    weights = picked / (tl.sum(picked, axis=1)[:, None] + 1e-20) * scale
    row = m.to(tl.int64) * (K + SHARED)
    out = row[:, None] + kcol[None, :]
    omask = mmask[:, None] & (kcol < K)[None, :]
    tl.store(wout_ptr + out, weights, mask=omask)
    tl.store(iout_ptr + out, chosen.to(tl.int64), mask=omask)
    if SHARED:
        tl.store(wout_ptr + row + K, tl.full([BM], 1.0, tl.float32), mask=mmask)
        tl.store(iout_ptr + row + K, tl.zeros([BM], tl.int64) + E, mask=mmask)


# --- host glue -----------------------------------------------------------------------------------
def _check_x(x, d, what):
    check(isinstance(x, torch.Tensor) and x.dtype in FLOATS and x.dim() >= 1 and x.shape[-1] == d,
          f"x: expected a float tensor (one of {list(FLOATS)}) with last dim {what} = {d}, got "
          f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")


def _route(name, x, weight, bias, table, tokens, k, score_func, scale, shared, config, into):
    """Checks shared by the routers, then the router kernel -> (weights [..., k] f32, experts [..., k] i64;
    shared: k + 1 slots, the last the shared expert's)."""
    cfg = launch_config(config, ROUTER_CONFIG, name, at_least=dict.fromkeys(ROUTER_CONFIG, 16))
    check_tensor("weight", weight, dtypes=FLOATS, dim=2)
    n_exp, d = weight.shape
    _check_x(x, d, "the router's D")
    check(score_func in SCORE_FUNCS, f"score_func {score_func!r}; supported: {', '.join(SCORE_FUNCS)}")
    check(isinstance(scale, (int, float)), f"scale: expected a number, got {scale!r}")
    check(shared in (True, False), f"shared: expected true or false, got {shared!r}")
    check(1 <= n_exp <= MAX_EXPERTS, f"weight: {n_exp} experts; supported: 1..{MAX_EXPERTS}")
    check(isinstance(k, int) and 1 <= k and (table is not None or k <= n_exp),
          f"k = {k!r} must be an int in [1, experts = {n_exp}]")
    check(table is None or table.numel() == 0 or once(("table ids", n_exp), table,
                                                      lambda: 0 <= int(table.min()) and int(table.max()) < n_exp),
          f"table: expert ids must be in [0, {n_exp})")
    same_device(x=x, weight=weight, bias=bias, table=table, tokens=tokens)
    xf = x.reshape(-1, d).contiguous()
    m = xf.shape[0]
    into_w, into_i = results(into, 2)
    slots = k + bool(shared)
    w_res = result(into_w, (*x.shape[:-1], slots), torch.float32, x.device)
    i_res = result(into_i, (*x.shape[:-1], slots), torch.int64, x.device)
    w_out, i_out = w_res.view(m, slots), i_res.view(m, slots)
    if m:
        _router_kernel[(cdiv(m, cfg["BLOCK_M"]),)](
            xf, weight, weight if bias is None else bias, weight if table is None else table,
            weight if tokens is None else tokens, w_out, i_out, m, d, n_exp, 0 if table is None else table.shape[0],
            float(scale), K=k, SCORE=SCORE_FUNCS[score_func], HASH=table is not None, SHARED=bool(shared),
            BM=cfg["BLOCK_M"], BE=max(16, next_pow2(n_exp)), BK=cfg["BLOCK_K"], KP=next_pow2(k))
    return w_res, i_res


def route_topk(x, weight, bias, *, k, score_func, scale, shared=False, config=None, into=None):
    """x: [..., D], weight: [E, D], bias: [E] -> weights [..., k] f32, experts [..., k] i64:
    experts = top-k of score(x W^T) + bias (equal values: lower index first), weights = their scores
    (without bias) / (sum + 1e-20) * scale. shared: [..., k + 1], the last slot expert E with weight 1 (the
    shared expert stacked after the routed ones). config: BLOCK_M (tokens a program), BLOCK_K."""
    check_tensor("bias", bias, dtypes=FLOATS, dim=1)
    check(isinstance(weight, torch.Tensor) and bias.shape[0] == weight.shape[0],
          f"bias: expected one value per expert ({getattr(weight, 'shape', ['?'])[0]}), got {list(bias.shape)}")
    return _route("route_topk", x, weight, bias, None, None, k, score_func, scale, shared, config, into)


def route_hash(x, weight, table, tokens, *, score_func, scale, shared=False, config=None, into=None):
    """Hash routing: experts = table[tokens] ([V, k] int table, tokens [...] int), weights (and shared) as in
    route_topk. x: [..., D], weight: [E, D] -> weights [..., k] f32, experts [..., k] i64."""
    check_tensor("table", table, dtypes=INTS, dim=2)
    check_tensor("tokens", tokens, dtypes=INTS, contiguous=False)
    check(isinstance(x, torch.Tensor) and tokens.shape == x.shape[:-1],
          f"tokens: expected x's leading shape {list(getattr(x, 'shape', [None])[:-1])}, got {list(tokens.shape)}")
    check(tokens.numel() == 0 or not host_values(tokens)
          or 0 <= int(tokens.min()) and int(tokens.max()) < table.shape[0],
          f"tokens: ids must be in [0, {table.shape[0]})")
    return _route("route_hash", x, weight, None, table, tokens.reshape(-1).contiguous(), table.shape[1], score_func,
                  scale, shared, config, into)


LAUNCHERS = {"route_topk": route_topk, "route_hash": route_hash}

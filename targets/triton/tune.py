"""Compile-time autotuning of launch configurations.

Steps with the same op, shapes, dtypes and attributes share one signature; the first step of each
signature is timed once per bucket (decode: `decode_batch` sequences of one token at the end of a
full context; prefill: one chunk of `prefill_chunk` tokens from an empty context) with every
candidate config from configs.py, on that step's real weights and random activations (routing
and selections drawn valid at random). The fastest config goes to every step of the signature; a
candidate the launcher refuses, or that needs more shared memory or registers than the GPU has,
is skipped and counted ("rejected"). Projections and experts are pure functions of their inputs, so
there every candidate's result is also held to the first config's: one that differs by more than
summation order (a miscompile, say of an experimental code path such as the warp-specialized K loop)
is skipped and counted too ("wrong"). The results go into the artifact's
launch.json, so the machines that run it never re-tune.
"""

from collections.abc import Callable

import torch
from triton.runtime.errors import OutOfResources

from v4c.ir import Module, ParamRef, load_weight

from .configs import BUCKETS, FAMILY, candidates

Timer = Callable[[Callable[[], object]], float]  # fn -> milliseconds


def gpu_timer(fn: Callable[[], object]) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=5, rep=25))


def _concrete(shape, batch: int, seq: int) -> list[int]:
    return [batch if d == "B" else seq if d == "S" else d for d in shape]


def _signature(m: Module, ins) -> tuple:
    def describe(o):
        t = m.params[o.name] if isinstance(o, ParamRef) else o.type
        return (tuple(t.shape), t.dtype)
    states = tuple((tuple(m.states[s].shape), m.states[s].dtype) for s in ins.state)
    return ins.op, tuple(describe(o) for o in ins.operands), repr(sorted(ins.attrs.items())), states


def _dtype(name: str) -> torch.dtype:
    from v4c.runtime.dtypes import torch_dtype
    return torch_dtype(name)


def _int_operand(m: Module, ins, role: int, shape: list[int], pos0: int, gen) -> torch.Tensor:
    """Valid integer inputs: distinct experts per token (MoE), causal entry picks (attention)."""
    if FAMILY.get(ins.op) == "experts" and role == 2:
        experts = m.params[ins.operands[3].name].shape[0] + (ins.op == "moe_experts_q_shared")  # gate_up: [E, ...]
        return torch.rand(*shape[:-1], experts, generator=gen).topk(shape[-1], dim=-1).indices
    if (ins.op, role) in (("attention_rope", 3), ("norm_attention_rope", 4), ("rope_index_topk", 2)):  # positions
        return torch.arange(pos0, pos0 + shape[0])
    if (ins.op, role) in (("attention", 3), ("attention_rope", 5), ("norm_attention_rope", 6)):
        visible = max((pos0 + 1) // ins.attrs["rate"], 1)
        return torch.randint(0, visible, shape, generator=gen)
    raise ValueError(f"no input generator for integer operand {role} of {ins.op}")


def _inputs(m: Module, ins, batch: int, seq: int, pos0: int, device: str, gen) -> tuple[list, dict]:
    args = []
    for role, o in enumerate(ins.operands):
        if isinstance(o, ParamRef):
            args.append(load_weight(m.weights[o.name]).to(device))
            continue
        shape, dtype = _concrete(o.type.shape, batch, seq), _dtype(o.type.dtype)
        if dtype.is_floating_point:
            x = torch.randn(shape, generator=gen)
            if FAMILY.get(ins.op) == "experts" and role == 1:
                x = x.softmax(-1)  # routing weights
            args.append(x.to(dtype).to(device))
        else:
            args.append(_int_operand(m, ins, role, shape, pos0, gen).to(device))
    kwargs = dict(ins.attrs)
    if ins.state:
        kwargs["state"] = tuple(torch.zeros(_concrete(m.states[s].shape, batch, 0), dtype=_dtype(m.states[s].dtype),
                                            device=device) for s in ins.state)
        kwargs["pos0"] = pos0
    return args, kwargs


# The families whose candidates' results are compared (pure functions of their inputs), and how far a candidate's
# result may lie from the first config's, over the first's largest magnitude. Projections: fp32 sums in another
# order, and on Hopper the fp8 wgmma's narrower accumulator where one config takes it and another mma (about 1.5e-4
# of the output scale on an H100, bench/results/triton_gpu.json). Experts: that too, but their gate_up result is
# quantized to e4m3 again for the down GEMM, where a last-bit difference can move a code by one step (6%).
RESULT_RTOL = {"gemm": 1e-3, "experts": 1e-2}


def _tensors(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


def _agrees(out, ref, rtol: float) -> bool:
    """Whether a candidate's result is the first config's up to summation order (within rtol of its largest
    magnitude; non-finite values where the first config's are)."""
    for a, b in zip(_tensors(out), _tensors(ref), strict=True):
        a, b = a.float(), b.float()
        if a.shape != b.shape or not bool(torch.isfinite(a).eq(torch.isfinite(b)).all()):
            return False
        fin = torch.isfinite(b)
        if fin.any() and float((a[fin] - b[fin]).abs().max()) > rtol * max(float(b[fin].abs().max()), 1e-30):
            return False
    return True


def _time_candidates(launcher, args, kwargs, configs: list[dict], timer: Timer,
                     rtol: float | None = None) -> tuple[dict | None, float, int, int]:
    """-> (fastest config, its ms, configs rejected, configs whose result was wrong). rtol: each candidate's result
    must agree with the first config's (the heuristic's, the reference here) within it (_agrees); None: unchecked."""
    best, best_ms, rejected, wrong, ref = None, float("inf"), 0, 0, None
    for config in configs:
        try:
            out = launcher(*args, config=config, **kwargs)  # compile, and let the launcher check the config
        except (ValueError, OutOfResources):  # refused by the launcher, or too large for this GPU
            rejected += 1
            continue
        if rtol is not None:
            if ref is None:
                ref = [t.clone() for t in _tensors(out)]
            elif not _agrees(out, ref, rtol):
                wrong += 1
                continue
        ms = timer(lambda c=config: launcher(*args, config=c, **kwargs))
        if ms < best_ms:
            best, best_ms = config, ms
    return best, best_ms, rejected, wrong


def tune_module(m: Module, launchers: dict, steps: dict[str, list[dict]], *, prefill_chunk: int, decode_batch: int,
                device: str, timer: Timer = gpu_timer, progress=None) -> dict:
    """Time candidates for every tunable signature; write the winners into `steps` (step index ->
    bucket list, from configs.heuristic) and return the tuning record."""
    gen = torch.Generator().manual_seed(0)
    groups: dict[tuple, list[int]] = {}
    for i, ins in enumerate(m.func.body):
        if ins.op in launchers and candidates(ins.op, "decode", ins.attrs):
            groups.setdefault(_signature(m, ins), []).append(i)
    results = []
    for n, indices in enumerate(groups.values()):
        ins = m.func.body[indices[0]]
        for b, (bucket, _) in enumerate(BUCKETS):
            batch, seq = (decode_batch, 1) if bucket == "decode" else (1, min(prefill_chunk, m.max_context))
            pos0 = m.max_context - seq if bucket == "decode" else 0
            args, kwargs = _inputs(m, ins, batch, seq, pos0, device, gen)
            tried = candidates(ins.op, bucket, ins.attrs)
            best, ms, rejected, wrong = _time_candidates(launchers[ins.op], args, kwargs, tried, timer,
                                                         rtol=RESULT_RTOL.get(FAMILY.get(ins.op)))
            if best is not None:
                for i in indices:
                    steps[str(i)][b] = {**steps[str(i)][b], "config": dict(best), "source": "tuned"}
            results.append({"op": ins.op, "steps": indices, "bucket": bucket, "tokens": batch * seq,
                            "config": best, "ms": None if best is None else round(ms, 6),
                            "tried": len(tried), "rejected": rejected, "wrong": wrong})
        if progress:
            progress("tuning kernels", n + 1, len(groups))
    return {"tuned": True, "device": device, "signatures": results}

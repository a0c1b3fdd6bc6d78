"""Where a decode step's time goes: per-op kernel time and the executor's dispatch share.

Opens an artifact, prefills `--context` random tokens, then times `--steps` decode steps, each run
twice: once as is (the step time), once with every entry of the session's flat call list wrapped
in a clock. The step time not spent inside the entries is the executor's dispatch (its loop and
the per-call setup). Entries are labelled `bound:<op>` (a compiled kernel called directly with fixed
tensors) or `py:<op>` (a Python kernel whose result is copied into its buffer). Medians over steps.

    .venv/bin/python bench/decode_profile.py build/bench/small-tvm [--context 2048] [--steps 16] [--json OUT]
"""

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict

import torch


def profile(path: str, context: int, steps: int, batch: int = 1, kernels: str = "auto") -> dict:
    from v4c.runtime.artifact import open_artifact
    art = open_artifact(path)
    session = art.session(batch, kernels=kernels)
    clock = time.perf_counter
    spent: dict[str, float] = defaultdict(float)
    g = torch.Generator().manual_seed(0)
    vocab = session.vocab_size
    session.forward(torch.randint(0, vocab, (batch, context), generator=g))
    session.forward(torch.randint(0, vocab, (batch, 1), generator=g))  # plans the decode shape
    plan = session._plans[1]
    plain = list(plan.entries)

    def timed(fn, label):
        def run(*args, **kwargs):
            t = clock()
            fn(*args, **kwargs)
            spent[label] += clock() - t
        return run

    wrapped = [(timed(fn, label), args, kw) for (fn, args, kw), label in zip(plain, plan.labels)]
    calls = defaultdict(int)
    for label in plan.labels:
        calls[label] += 1
    totals, timed_walls, per_step = [], [], []
    for _ in range(steps):
        tok = torch.randint(0, vocab, (batch, 1), generator=g)
        plan.entries = plain
        t = clock()
        session.forward(tok)
        totals.append(clock() - t)
        session.pos -= 1  # the same step again, every entry timed
        spent.clear()
        plan.entries = wrapped
        t = clock()
        session.forward(tok)
        timed_walls.append(clock() - t)
        per_step.append(dict(spent))
    plan.entries = plain
    wall = statistics.median(timed_walls)
    by_op = {op: {"ms": 1e3 * statistics.median(s.get(op, 0.0) for s in per_step), "calls": calls[op]}
             for op in calls}
    kernel_ms = sum(v["ms"] for v in by_op.values())
    return {"artifact": path, "context": context, "batch": batch, "steps": steps,
            "step_ms": 1e3 * statistics.median(totals), "timed_step_ms": 1e3 * wall, "kernel_ms": kernel_ms,
            "dispatch_ms": 1e3 * wall - kernel_ms, "dispatch_share": (1e3 * wall - kernel_ms) / (1e3 * wall),
            "calls_per_step": len(plain),
            "ops": dict(sorted(by_op.items(), key=lambda kv: -kv[1]["ms"]))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    r = profile(args.artifact, args.context, args.steps, args.batch, args.kernels)
    print(f"decode step {r['step_ms']:.2f} ms (timed {r['timed_step_ms']:.2f}): entries {r['kernel_ms']:.2f} ms, "
          f"dispatch {r['dispatch_ms']:.2f} ms ({100 * r['dispatch_share']:.0f}%), {r['calls_per_step']} calls")
    for op, v in r["ops"].items():
        print(f"  {op:32s} {v['ms']:7.3f} ms  {v['calls']:4d} calls")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

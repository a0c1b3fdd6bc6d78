"""The host time of a triton artifact's decode step without its kernels: what v4c's Python costs per step.

On the H100 (results/triton_gpu.json) a `small` decode step was host-bound: 254 launcher calls around kernels of
microseconds. This measures that host side on any machine, without a GPU: the `small` / `medium` triton artifact
(the FP8 recipe of bench/triton_gpu.py) runs its decode steps with every launcher deciding as on an H100
(tests/gpu_semantics.as_gpu: native casts, no host id checks, 132 SMs) but every Triton launch replaced by a
no-op that counts it. What is left is the executor, the launchers' checks and config lookups, and the torch ops
they issue (on the CPU here; on a GPU they are asynchronous launches of similar host cost). Triton's own launcher
(`JITFunction.run`: argument binding, specialization, the driver call) is not in it: it needs a GPU, and comes on
top, per Triton launch (counted).

A few more steps, untimed, count the torch ops each entry issues that would run a kernel on a GPU (besides its
Triton launches; in a CUDA graph too): in-place ops and ops with new results, not views or allocations.

Then a session with CUDA graphs (a stand-in capturer: a "replay" runs the segment's entries, so what is
counted is what a graph would hold) plans the decode step: `graphs` gives the host calls a step makes (graph
replays plus the entries outside graphs), the entries in graphs, and the Triton launches and torch kernels
per step there (the stateful steps at a device position launch a few more kernels, sized by capacity).

Nothing is computed, so buffers are zeros (`torch.empty` is `torch.zeros` during the steps, so gathered ids stay
in range). Each decode step is timed whole and per plan entry; the entries of the stateful ops (compress,
index_topk, attention) are told apart: a CUDA-graph session called them from Python until they read the session
position on the device in a decode step (commit 2e2a6c5).

    TRITON_INTERPRET=1 .venv/bin/python bench/host_overhead.py [--configs small,medium] [--steps 50]
        [--out bench/results/host_overhead.json]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU tensors, nothing compiled

import torch  # noqa: E402
import triton  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))  # gpu_semantics

from triton_gpu import MEDIUM, SMALL, _build  # noqa: E402

from v4c.runtime.kernels import STATEFUL  # noqa: E402

FACTORIES = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")


def _views(out, inputs) -> bool:
    """Whether every tensor `out` holds shares the storage of an input tensor (a view: no kernel runs)."""
    from torch.utils._pytree import tree_leaves
    storages = {t.untyped_storage().data_ptr() for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)}
    results = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    return bool(results) and all(t.untyped_storage().data_ptr() in storages for t in results)


def _device_op_counter():
    """A TorchDispatchMode counting the torch ops that would run a kernel on a GPU: in-place ops and ops with new
    results, not views (results that share their inputs' storage), bare allocations (torch.empty) or scalar
    reads (`.item()`, counted apart as host syncs: on a GPU each waits for it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.label, self.kernels, self.syncs = None, defaultdict(int), defaultdict(int)
            self.names = defaultdict(lambda: defaultdict(int))  # label -> aten op -> count
            self.hidden = 0  # zero_ calls of the bench's own (torch.empty as zeros) still to come

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            out = func(*args, **(kwargs or {}))
            if name == "zero_" and self.hidden:
                self.hidden -= 1
                return out
            if name == "_local_scalar_dense":
                self.syncs[self.label] += 1
                return out
            writes = any(r.alias_info is not None and r.alias_info.is_write for r in func._schema.returns)
            if name not in FACTORIES and (writes or not _views(out, (args, kwargs))):
                self.kernels[self.label] += 1
                self.names[self.label][name] += 1
            return out
    return Counter()


class _Replays:
    """A stand-in for executor.CudaGraphs: "captures" a segment by keeping its entries, replayed as they are."""

    def __init__(self):
        self.failed: list[str] = []

    def capture(self, run, arena):
        return run


def _graph_step(art, kernels, prompt: int, launched: list, counter) -> dict:
    """Host calls, entries in graphs, Triton launches and torch kernels of a decode step with graphs."""
    from v4c.runtime.executor import Session
    session = Session(art.program, art.weights(), kernels=kernels, graphs=_Replays())
    session.forward(torch.zeros(1, prompt, dtype=torch.long))
    for _ in range(2):  # the decode plan: eager, then captured
        session.forward(torch.zeros(1, 1, dtype=torch.long))
    steps, before = 4, len(launched)  # a CSA window
    counter.hidden = 0
    with counter:
        for _ in range(steps):
            session.forward(torch.zeros(1, 1, dtype=torch.long))
    report = session.graph_report()["shapes"]["1"]
    names = Counter(getattr(fn, "__name__", None) or fn.fn.__name__ for fn in launched[before:])
    return {"host_calls_per_step": report["host_calls"], "graphs": report["graphs"],
            "entries_in_graphs": report["entries_in_graphs"], "entries": report["entries"],
            "triton_launches_per_step": (len(launched) - before) / steps,
            "torch_kernels_per_step": sum(counter.kernels.values()) / steps,
            "triton_kernels_per_step": {name: n / steps for name, n in names.most_common()}}


def measure(path: Path, steps: int, prompt: int) -> dict:
    import pytest
    from gpu_semantics import as_gpu
    from triton.runtime.interpreter import InterpretedFunction

    import v4c.runtime.kernelset as kernelset
    from v4c.runtime.artifact import open_artifact
    from v4c.runtime.executor import Session
    art = open_artifact(path)
    kernels = kernelset.triton_kernels(art.store, art.manifest, device="cpu")
    session = Session(art.program, art.weights(), kernels=kernels)
    patch = pytest.MonkeyPatch()
    as_gpu(patch, sms=132)  # the artifact's kernel package is loaded now
    empty, counter, graph_counter = torch.empty, _device_op_counter(), _device_op_counter()
    counting = [counter]  # the counter the bench's zeroing is hidden from

    def zeroed(*a, **k):  # the bench's, not the launchers': not counted as a kernel
        t = empty(*a, **k)
        if "out" not in k:
            counting[0].hidden += 1
            t.zero_()
        return t
    patch.setattr(torch, "empty", zeroed)
    launched = []  # every Triton launch (kernel[grid](...)) counted and skipped
    patch.setattr(InterpretedFunction, "run", lambda fn, *args, grid, warmup, **kwargs: launched.append(fn))
    try:
        session.forward(torch.zeros(1, prompt, dtype=torch.long))  # prefill: plans, first-call caches
        session.forward(torch.zeros(1, 1, dtype=torch.long))  # the decode plan
        plan = session._plans[1]
        per_label = defaultdict(list)

        def timed(fn, label):
            op = label.split(":", 1)[1]

            def call(*args, **kwargs):
                counter.label = op
                t0 = time.perf_counter_ns()
                fn(*args, **kwargs)
                per_label[label].append(time.perf_counter_ns() - t0)
                counter.label = None  # the executor's own ops, between entries
            return call
        plan.entries = [(timed(fn, label), args, kw) for (fn, args, kw), label in zip(plan.entries, plan.labels)]
        step_ns, before = [], len(launched)
        for _ in range(steps):
            t0 = time.perf_counter_ns()
            session.forward(torch.zeros(1, 1, dtype=torch.long))
            step_ns.append(time.perf_counter_ns() - t0)
        launches = (len(launched) - before) / steps
        timed_calls = {label: len(ns) for label, ns in per_label.items()}
        counted = 4  # then a few steps untimed (a CSA window), counting the torch ops each entry issues
        counter.hidden = 0  # (the timed steps' zeroing ran outside the mode)
        with counter:
            for _ in range(counted):
                session.forward(torch.zeros(1, 1, dtype=torch.long))
        counting[0] = graph_counter
        graphs = _graph_step(art, kernels, prompt, launched, graph_counter)
    finally:
        patch.undo()
    for label, ns in per_label.items():
        del ns[timed_calls[label]:]  # the counted steps' times (under the mode) are not kept
    ops = {}
    for label, ns in per_label.items():
        op = label.split(":", 1)[1]
        calls = len(ns) // steps
        row = ops.setdefault(op, {"calls_per_step": 0, "us_per_step": 0.0, "stateful": op in STATEFUL})
        row["calls_per_step"] += calls
        row["us_per_step"] += sum(ns) / steps / 1e3
    for op, row in ops.items():
        per = counted * max(row["calls_per_step"], 1)
        row["torch_kernels_per_call"] = round(counter.kernels[op] / per, 1)
        row["torch_kernel_ops"] = {name: round(n / per, 1) for name, n in sorted(counter.names[op].items())}
        row["us_per_call"] = round(row["us_per_step"] / max(row["calls_per_step"], 1), 1)
        row["us_per_step"] = round(row["us_per_step"], 1)
    entries = sum(r["calls_per_step"] for r in ops.values())
    stateful = [r for r in ops.values() if r["stateful"]]
    return {"decode_step_us": {"median": round(statistics.median(step_ns) / 1e3, 1),
                               "min": round(min(step_ns) / 1e3, 1), "max": round(max(step_ns) / 1e3, 1)},
            "entries_per_step": entries, "triton_launches_per_step": launches,
            "entries_us_per_step": round(sum(r["us_per_step"] for r in ops.values()), 1),
            "torch_kernels_per_step": sum(counter.kernels.values()) / counted,
            "host_syncs_per_step": sum(counter.syncs.values()) / counted,
            "executor_torch_kernels_per_step": counter.kernels[None] / counted,
            "stateful_entries_per_step": sum(r["calls_per_step"] for r in stateful),
            "stateful_us_per_step": round(sum(r["us_per_step"] for r in stateful), 1),
            "graphs": graphs,
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["us_per_step"]))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="small,medium", help="small, medium (issue 7's), or a tiny test config such "
                    "as hc4_mixed")
    ap.add_argument("--steps", type=int, default=50, help="decode steps timed per config")
    ap.add_argument("--prompt", type=int, default=64, help="prefill tokens before the decode steps (not timed)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            kwargs = {"small": SMALL, "medium": MEDIUM}.get(name, name)  # or a test config (tests/oracle.py)
            path, _ = _build(Path(tmp), name, kwargs, args.prompt, args.steps + 2)
            r = rows[name] = measure(path, args.steps, args.prompt)
            print(f"{name}: decode step {r['decode_step_us']['median']:.0f} us of host time without kernels "
                  f"({r['entries_per_step']} entries, {r['triton_launches_per_step']:.0f} Triton launches, "
                  f"{r['torch_kernels_per_step']:.0f} torch kernels, {r['host_syncs_per_step']:.0f} host syncs; the "
                  f"{r['stateful_entries_per_step']} stateful entries {r['stateful_us_per_step']:.0f} us)", flush=True)
            g = r["graphs"]
            print(f"  with CUDA graphs: {g['host_calls_per_step']} host calls a step ({g['graphs']} graphs holding "
                  f"{g['entries_in_graphs']} of {g['entries']} entries), {g['triton_launches_per_step']:.0f} Triton "
                  f"launches, {g['torch_kernels_per_step']:.0f} torch kernels", flush=True)
            for op, o in r["ops"].items():
                print(f"  {op:22} {o['calls_per_step']:4} calls {o['us_per_call']:8.1f} us/call "
                      f"{o['us_per_step']:9.1f} us/step {o['torch_kernels_per_call']:5.1f} torch kernels/call"
                      f"{'  (stateful)' if o['stateful'] else ''}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "benchmark": "host_overhead", "date": time.strftime("%Y-%m-%d"),
            "command": "TRITON_INTERPRET=1 .venv/bin/python bench/host_overhead.py " + " ".join(argv or sys.argv[1:]),
            "what": "host time of one decode step with every Triton launch skipped (launchers deciding as on an "
                    "H100); Triton's own launcher cost per launch is not included",
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "triton": triton.__version__},
            "recipe": "bench/triton_gpu.py FP8_RECIPE", "steps": args.steps, "configs": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()

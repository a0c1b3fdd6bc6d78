"""Host calls of one decode step of a triton artifact, eager and with CUDA graphs (runtime/executor.py).

Eagerly, every entry of the session's flat call list is one Python launcher call on the host (plus its
Triton launches). With `graphs`, every run of consecutive position-independent entries is one graph
replay. The stateful steps (compress, index_topk, attention) read the session position on the device in a
decode step (executor._device_position), so a decode step over dense KV state is one replay; before they
did (commit 08a9988), they stayed Python calls between the graphs. This counts both for the `small` and
`medium` configurations of issue 7 (the FP8 recipe of bench/triton_gpu.py): a structural count of the plan,
no timing, so it runs on the CPU (TRITON_INTERPRET=1; nothing is launched). `--experts fp4`: the recipe with FP4
e2m1 experts, as DeepSeek's release layout ships them (bench/results/graph_segments_fp4.json).

    .venv/bin/python bench/graph_segments.py [--configs small,medium] [--experts fp8|fp4]
                                             [--out bench/results/graph_segments.json]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: plans on the CPU

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from triton_gpu import FP8_RECIPE, MEDIUM, SMALL, _build  # noqa: E402

from v4c.runtime.kernels import STATEFUL  # noqa: E402


class PlanOnly:
    """A capturer that is never asked to capture: the plan is built, not run."""
    failed: list = []

    def capture(self, run, arena):
        raise AssertionError("graph_segments.py plans only")


def count(path: Path) -> dict:
    from v4c.runtime.artifact import open_artifact
    from v4c.runtime.executor import Session
    from v4c.runtime.kernelset import triton_kernels
    art = open_artifact(path)
    kernels = triton_kernels(art.store, art.manifest, device="cpu")
    eager = Session(art.program, art.weights(), kernels=kernels)._plan(1)
    graphed = Session(art.program, art.weights(), kernels=kernels, graphs=PlanOnly())
    graphed._plans[1] = graphed._plan(1)
    report = graphed.graph_report()["shapes"]["1"]
    stateful = sum(label.split(":")[1] in STATEFUL for label in eager.labels)
    return {"eager_host_calls": len(eager.entries), "graph_host_calls": report["host_calls"],
            "graphs": report["graphs"], "stateful_entries": stateful,
            "entries_in_graphs": report["entries_in_graphs"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="small,medium")
    ap.add_argument("--experts", choices=("fp8", "fp4"), default="fp8",
                    help="the routed experts' format (fp4: e2m1 with per-32 UE8M0 scales; the rest FP8 as before)")
    ap.add_argument("--out", help="write the counts as JSON here")
    args = ap.parse_args(argv)
    recipe = FP8_RECIPE if args.experts == "fp8" else FP8_RECIPE.replace("      kv: fp8\n", "      experts: fp4\n      kv: fp8\n")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            path, _ = _build(Path(tmp), name, {"small": SMALL, "medium": MEDIUM}[name], 16, 16, recipe)
            rows[name] = count(path)
            print(f"{name}: decode step host calls {rows[name]['eager_host_calls']} eager -> "
                  f"{rows[name]['graph_host_calls']} with CUDA graphs ({rows[name]['graphs']} graphs holding "
                  f"{rows[name]['entries_in_graphs']} entries, {rows[name]['stateful_entries']} of them stateful)",
                  flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "benchmark": "graph_segments", "date": time.strftime("%Y-%m-%d"),
            "command": f".venv/bin/python bench/graph_segments.py --experts {args.experts} --out {args.out}",
            "what": "host calls of one decode step (plan count, no timing; CPU, TRITON_INTERPRET=1)",
            "recipe": "bench/triton_gpu.py FP8_RECIPE" + (", experts: fp4" if args.experts == "fp4" else ""),
            "configs": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()

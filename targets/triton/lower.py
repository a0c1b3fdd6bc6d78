"""Lower an IR module for the `triton` target.

The program is the torch target's (same steps, same kernel names) after five rewrites: shared_expert.py, a MoE
block's shared expert is routed as one more expert (its router's `shared` slot, its weights stacked after the
experts', or kept for a K loop of their own in moe_experts_q_shared where they cannot stack); siblings.py, projections of one input join into one GEMM launch (linear_cat / linear_fp8_cat, their
weights concatenated in the artifact); then norm_gemm.py, a norm read by one FP8 projection goes into it
(norm_linear_fp8); then compress_pair.py, a CSA layer's two compressors become one op (one launch at a decode step);
then hc_ends.py, the embedding stores the hc streams itself (no hc_expand) and the last hc_post is computed in
hc_head's launch (hc_post_head), with the final norm where no FP8 lm_head took it (hc_post_head_norm).
What runs the steps differs. The artifact also carries `kernels/triton/`: this package's kernels/ as source
(imported by the runtime, compiled by Triton on first use), and launch.json:

    {"format": 1, "triton": "3.9.0",
     "triton_ops": [ops with a Triton kernel], "torch_ops": {op: why it runs as the torch kernel},
     "steps": {"12": [{"max_tokens": 16, "config": {...}, "source": "tuned"},
                      {"max_tokens": null, "config": {...}, "source": "heuristic"}], ...},
     "tuning": {"tuned": false, "reason": ...} or {"tuned": true, "device": ..., "signatures": [...]}}

`tune`: "auto" times candidate configs when the compiling machine has a CUDA GPU (and records
the heuristics otherwise), "on" requires a GPU, "off" records the heuristics.
"""

import json
import os
from pathlib import Path

import torch
import triton

from v4c.ir import Module
from v4c.passes import memory_plan
from v4c.runtime.errors import V4CError
from v4c.runtime.kernelset import LAUNCH, LAUNCH_FORMAT, PACKAGE, VIEWS
from v4c.targets import Lowered
from v4c.targets.torch import lower as torch_lower

from .configs import heuristic
from . import compress_pair, hc_ends, norm_gemm, shared_expert, siblings
from .kernels import LAUNCHERS
from .tune import tune_module

KERNELS_DIR = Path(__file__).parent / "kernels"
WHY_TORCH = {"fake_quant": "the fp8 pass's reference path (fake_quant: true) has no Triton kernel; compile "
                           "without fake_quant to run quantized layers as Triton kernels"}


def _gpu_for_tuning(tune: str) -> tuple[str | None, str]:
    """(device to tune on or None, why not)."""
    if tune == "off":
        return None, "tune: off"
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        if tune == "on":
            raise V4CError("tune: on needs a CUDA GPU on the compiling machine (and TRITON_INTERPRET unset); "
                           "use tune: auto to record the heuristic launch configs instead")
        return None, "no CUDA GPU at compile time"
    return "cuda", ""


def lower(m: Module, *, prefill_chunk: int, tune: str = "auto", decode_batch: int = 1, progress=None) -> Lowered:
    m, shared = shared_expert.fold(m)  # the shared expert as one more routed expert (shared_expert.py)
    m, joined = siblings.join(m)  # sibling projections: one GEMM launch (siblings.py)
    m, normed = norm_gemm.fold(m)  # a norm read by one FP8 projection: in its GEMM (norm_gemm.py)
    m, paired = compress_pair.join(m)  # a CSA layer's two compressors: one op (compress_pair.py)
    m, ends = hc_ends.fold(m)  # the embedding into the streams, the last hc_post into hc_head (hc_ends.py)
    rewritten = shared or joined["launches"] or normed or paired or any(ends.values())
    if rewritten:
        m = memory_plan.run(m, memory_plan.Options())  # values made earlier, or gone: plan the buffers again
    if progress and shared:
        progress(f"triton: {shared} shared experts routed with the experts (2 GEMM launches fewer each)")
    if progress and joined["launches"]:
        progress(f"triton: {joined['saved'] + joined['launches']} sibling projections joined into "
                 f"{joined['launches']} GEMM launches")
    if progress and normed:
        progress(f"triton: {normed} norms folded into the FP8 projections that read them")
    if progress and paired:
        progress(f"triton: {paired} pairs of compressors joined (one launch each at a decode step)")
    if progress and any(ends.values()):
        progress(f"triton: {ends['embeds']} embeddings write the hc streams, {ends['heads']} hc_post in hc_head, "
                 f"{ends['norms']} final norms with them (one launch each fewer)")
    program = torch_lower(m, prefill_chunk=prefill_chunk)
    used = sorted({s.kernel for s in program.steps} - VIEWS)
    torch_ops = {op: WHY_TORCH.get(op, "no Triton kernel for this op") for op in used if op not in LAUNCHERS}
    steps = {str(i): heuristic(s.kernel, s.attrs) for i, s in enumerate(program.steps) if s.kernel in LAUNCHERS}
    device, why = _gpu_for_tuning(tune)
    if device is None:
        tuning = {"tuned": False, "reason": f"{why}: launch configs are the heuristics of targets/triton/configs.py"}
    else:
        tuning = tune_module(m, LAUNCHERS, steps, prefill_chunk=prefill_chunk, decode_batch=decode_batch,
                             device=device, progress=progress)
        tuning["device"] = torch.cuda.get_device_name()
    launch = {"format": LAUNCH_FORMAT, "triton": triton.__version__, "triton_ops": [op for op in used if op in LAUNCHERS],
              "torch_ops": torch_ops, "steps": steps, "tuning": tuning}
    files: dict = {f"{PACKAGE}/{p.name}": p for p in sorted(KERNELS_DIR.glob("*.py"))}
    files[LAUNCH] = (json.dumps(launch, indent=1, sort_keys=True) + "\n").encode()
    manifest = {"toolchain": {"triton": triton.__version__},
                "kernels": {"package": PACKAGE, "launch": LAUNCH, "triton_ops": launch["triton_ops"],
                            "torch_ops": torch_ops, "tuned": tuning["tuned"], "joined_siblings": joined,
                            "norms_in_gemms": normed, "compressor_pairs": paired,
                            "shared_experts_routed": shared, "hc_ends": ends}}
    return Lowered(program, files, manifest, module=m if rewritten else None)

"""`compile_model`: model.yaml -> artifact directory (what `v4c compile` runs).

With a `calibration:` section the compile also builds the report (the compiled module against
the unquantized one on held-out text) and checks the drift gates; a failing gate stops the
compile before anything is written, unless `allow_drift`.
"""

import json
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from v4c import __version__
from v4c.artifact_writer import Progress, write_artifact
from v4c.frontend import import_checkpoint
from v4c.pipeline import build_pipeline, run_pipeline
from v4c.report import DriftError, build_report, check, render, table
from v4c.report.gates import headline
from v4c.spec import load_spec
from v4c.targets import TARGETS

DECODE_BATCH = 16  # most sequences per decode step that launch configs are tuned for


@dataclass
class CompileResult:
    out: Path
    manifest: dict
    skipped: dict[str, str]  # checkpoint tensors the model does not use -> why
    report: dict | None = None


def _portable(options: dict) -> dict:
    """Pass options as the manifest records them: paths by file name, so the bytes do not depend on
    where the inputs live."""
    return {k: (v.name if isinstance(v, Path) else v) for k, v in options.items()}


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def compile_model(spec_path, out_dir, *, progress: Progress | None = None, dump_ir: Path | None = None,
                  allow_drift: bool = False) -> CompileResult:
    spec, ckpt_dir = load_spec(spec_path)
    reference, ckpt = import_checkpoint(ckpt_dir, max_context=spec.kv.max_context)
    tokenizer = next((f for f in ckpt.tokenizer_files if f.name == "tokenizer.json"), None)
    pipeline = build_pipeline(spec, tokenizer)
    module = run_pipeline(reference, pipeline, dump_dir=dump_ir, progress=progress)
    lowered = TARGETS[spec.target](module, prefill_chunk=spec.kv.prefill_chunk, tune=spec.tune,
                                   decode_batch=min(spec.kv.concurrency, DECODE_BATCH), tvm_target=spec.tvm_target,
                                   progress=progress)
    program = lowered.program
    compiled = module  # what the calibration report measures: the target's rewrites change no number
    if lowered.module is not None:  # the target rewrote the module before lowering it (tvm: the fuse pass undone;
        module = lowered.module     # triton: sibling projections joined, their weights concatenated; norms in GEMMs)
    extra = {f"tokenizer/{f.name}": f for f in ckpt.tokenizer_files}
    extra.update(lowered.files)
    plan = module.plans["memory"]
    extra["plans/memory.json"] = _json(plan)
    extra["plans/kv.json"] = _json(module.plans["kv"])
    manifest = {
        "producer": {"name": "v4c", "version": __version__},
        "model": module.config,
        "source": {"checkpoint": ckpt.path.name, "layout": ckpt.layout,
                   "skipped_tensors": dict(sorted(ckpt.unused.items()))},
        "pipeline": [{"name": p.name, "options": _portable(p.options)} for p in pipeline],
        "counters": module.counters,
        "target": {"name": spec.target, **lowered.manifest,
                   "toolchain": {"python": platform.python_version(), "torch": torch.__version__,
                                 **lowered.manifest.get("toolchain", {})}},
        "kv": {"max_context": module.max_context,
               "state": {k: {"shape": list(t.shape), "dtype": t.dtype} for k, t in module.states.items()},
               "plan": {"file": "plans/kv.json", **{k: module.plans["kv"][k] for k in
                                                    ("concurrency", "page_tokens", "budgets", "totals",
                                                     "bytes_per_decode_step", "session_bytes")}}},
        "memory_plan": {"file": "plans/memory.json", "bytes_per_token": plan["bytes_per_token"],
                        "prefill_chunk": program.prefill_chunk, "arena_bytes_batch1": program.arena_bytes(1),
                        "bytes_per_token_without_reuse": module.counters["memory_plan"]["bytes_per_token_without_reuse"]},
        "tokenizer": "tokenizer/tokenizer.json" if tokenizer else None,
    }
    report = None
    if spec.calibration is not None:
        report = build_report(reference, compiled, spec, tokenizer, progress)
        thresholds = spec.report.thresholds.model_dump() if spec.report else {}
        rows = check(report, thresholds)
        failed = [r for r in rows if not r["passed"]]
        report["gates"] = {"thresholds": thresholds, "results": rows, "passed": not failed,
                           "written_despite_failure": bool(failed and allow_drift)}
        if failed and not allow_drift:
            raise DriftError(f"drift gates failed; no artifact was written (--allow-drift writes it anyway):\n"
                             f"{table(rows)}")
        extra["report/calibration.json"] = _json(report)
        extra["report/index.html"] = render(report, rows, thresholds).encode()
        manifest["report"] = {"file": "report/index.html", "data": "report/calibration.json", **headline(report),
                              "gates_passed": not failed}
    manifest = write_artifact(out_dir, module, program, manifest, extra_files=extra, progress=progress)
    return CompileResult(Path(out_dir), manifest, ckpt.unused, report)

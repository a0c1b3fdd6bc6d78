"""`compile_model`: model.yaml -> artifact directory (what `v4c compile` runs)."""

import json
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from v4c import __version__
from v4c.artifact_writer import Progress, write_artifact
from v4c.frontend import import_checkpoint
from v4c.pipeline import build_pipeline, run_pipeline
from v4c.spec import load_spec
from v4c.targets import TARGETS


@dataclass
class CompileResult:
    out: Path
    manifest: dict
    skipped: dict[str, str]  # checkpoint tensors the model does not use -> why


def compile_model(spec_path, out_dir, *, progress: Progress | None = None, dump_ir: Path | None = None) -> CompileResult:
    spec, ckpt_dir = load_spec(spec_path)
    module, ckpt = import_checkpoint(ckpt_dir, max_context=spec.kv.max_context)
    pipeline = build_pipeline(spec)
    module = run_pipeline(module, pipeline, dump_dir=dump_ir)
    program = TARGETS[spec.target](module, prefill_chunk=spec.kv.prefill_chunk)
    manifest = {
        "producer": {"name": "v4c", "version": __version__},
        "model": module.config,
        "source": {"checkpoint": ckpt.path.name, "layout": ckpt.layout,
                   "skipped_tensors": dict(sorted(ckpt.unused.items()))},
        "pipeline": [{"name": p.name, "options": p.options} for p in pipeline],
        "counters": module.counters,
        "target": {"name": spec.target, "toolchain": {"python": platform.python_version(), "torch": torch.__version__}},
        "kv": {"max_context": module.max_context,
               "state": {k: {"shape": list(t.shape), "dtype": t.dtype} for k, t in module.states.items()}},
        "tokenizer": "tokenizer/tokenizer.json" if any(f.name == "tokenizer.json" for f in ckpt.tokenizer_files)
                     else None,
    }
    plan = module.plans["memory"]
    manifest["memory_plan"] = {
        "file": "plans/memory.json", "bytes_per_token": plan["bytes_per_token"],
        "prefill_chunk": program.prefill_chunk, "arena_bytes_batch1": program.arena_bytes(1),
        "bytes_per_token_without_reuse": module.counters["memory_plan"]["bytes_per_token_without_reuse"]}
    extra = {f"tokenizer/{f.name}": f for f in ckpt.tokenizer_files}
    extra["plans/memory.json"] = (json.dumps(plan, indent=1, sort_keys=True) + "\n").encode()
    manifest = write_artifact(out_dir, module, program, manifest, extra_files=extra, progress=progress)
    return CompileResult(Path(out_dir), manifest, ckpt.unused)

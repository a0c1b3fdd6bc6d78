"""The compile pipeline: one list of passes, with the IR checker run after every pass."""

from collections.abc import Callable
from pathlib import Path

from v4c.ir import Module, print_module, verify
from v4c.passes import PASSES
from v4c.spec import PassSpec, Spec


def build_pipeline(spec: Spec, tokenizer: Path | None = None) -> list[PassSpec]:
    c = spec.calibration
    analysis = [] if c is None else [PassSpec(name="calibrate", options=dict(
        data=c.data, tokenizer=tokenizer, samples=c.samples, seq_len=c.seq_len, seed=c.seed,
        min_expert_tokens=c.min_expert_tokens, holdout=c.heldout is None))]
    return [
        # 0. analysis: calibration statistics, when model.yaml gives calibration data
        *analysis,
        # 1. the passes model.yaml asks for, in its order
        *spec.pass_specs(),
        # 2. clean-up: whatever earlier passes left unused
        PassSpec(name="dce"),
        # 3. planning (after the last pass that changes the graph): KV tiers, activation buffers
        PassSpec(name="kv_plan", options=kv_options(spec)),
        PassSpec(name="memory_plan"),
    ]


def kv_options(spec: Spec, context: int | None = None, concurrency: int | None = None) -> dict:
    t = spec.kv.tiers
    return {"concurrency": concurrency or spec.kv.concurrency, "page_tokens": spec.kv.page_tokens,
            "device": None if t.device is None else int(t.device), "host": None if t.host is None else int(t.host),
            "disk": None if t.disk is None else int(t.disk.size)}


def run_pipeline(module: Module, pipeline: list[PassSpec], *, dump_dir: Path | None = None,
                 on_pass: Callable[[str, Module], None] | None = None, progress=None) -> Module:
    """Run each pass, verify the result, and optionally dump the IR after each one."""
    verify(module)
    if dump_dir:
        dump_dir.mkdir(parents=True, exist_ok=True)
        (dump_dir / "00-frontend.v4ir").write_text(print_module(module))
    for i, p in enumerate(pipeline, 1):
        d = PASSES[p.name]
        module = d.run(module, d.options.model_validate(p.options), progress=progress)
        verify(module)
        if dump_dir:
            (dump_dir / f"{i:02d}-{p.name}.v4ir").write_text(print_module(module))
        if on_pass:
            on_pass(p.name, module)
    return module

"""`plan_model`: the KV plan of a model.yaml from its config alone (what `v4c plan` runs).

No weight is read: the IR is built with metadata-only weights, the configured passes that shape
the KV state (fp8: its formats) run on it, and the kv_plan pass places the state.
"""

import json
from pathlib import Path

import torch

from v4c.frontend.configs import read_config
from v4c.frontend.graph import build_module
from v4c.ir import WeightSource
from v4c.passes import PASSES, kv_plan
from v4c.pipeline import kv_options
from v4c.runtime.config import ConfigError
from v4c.runtime.errors import V4CError
from v4c.spec import load_spec


def _metadata_only(name: str, shape) -> WeightSource:
    dtype = torch.int32 if name.endswith("tid2eid") else torch.bfloat16

    def never():
        raise AssertionError(f"planning read weight {name}")
    return WeightSource(shape, dtype, never, name)


def plan_model(spec_path, context: int | None = None, concurrency: int | None = None) -> dict:
    spec, ckpt = load_spec(spec_path)
    try:
        config = read_config(json.loads((Path(ckpt) / "config.json").read_text()))
    except (OSError, json.JSONDecodeError, ConfigError) as e:
        raise V4CError(f"{ckpt}/config.json: {e}") from None
    context = context or spec.kv.max_context
    module = build_module(config, _metadata_only, max_context=context, name=Path(ckpt).name)
    for p in spec.pass_specs():
        options = dict(p.options)
        if p.name == "fp8":  # the KV formats are what matter here; static scales would need calibration
            options["activations"] = {"mode": "none"}
        module = PASSES[p.name].run(module, PASSES[p.name].options.model_validate(options))
    return kv_plan.plan(module, kv_plan.Options(**kv_options(spec, concurrency=concurrency)), context)

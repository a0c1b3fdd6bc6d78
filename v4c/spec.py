"""`model.yaml`: one strict schema. Unknown keys, wrong types, missing paths and unreadable YAML
are `SpecError`s that name the file, line and column, the key, what was found and what is allowed.

    model:
      checkpoint: ./ckpt      # relative to this file; layout detected
    target: torch             # or triton (GPU kernels) or tvm (CPU kernels; tvm_target: {kind: llvm, mcpu: ...})
    tune: auto                # triton: tune launch configs on the compiling GPU, if any
    passes: []
    kv:
      max_context: 4096       # tokens a session can hold (sizes the KV / compressor state)
      prefill_chunk: 256      # tokens per forward step (sizes the activation arena)
      concurrency: 1          # sequences in flight; tiers are planned for all of them
      page_tokens: 64
      tiers: {device: 512MiB, host: 8GiB, disk: {path: ./kv-cache, size: 50GiB}}
    calibration:              # optional: statistics for the fp8 pass, and the report
      data: ./calib.txt
    report:
      thresholds: {max_kl: 0.01, min_top1: 0.97}
"""

import difflib
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator

from v4c.passes import LISTABLE, PASSES
from v4c.runtime.errors import V4CError
from v4c.targets import TARGETS

from .yamlpos import Pos, YamlError, load_with_positions


class SpecError(V4CError):
    def __init__(self, file, pos: Pos | None, message: str):
        where = f"{file}:{pos.line}:{pos.col}" if pos else f"{file}"
        super().__init__(f"{where}: error: {message}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Strict):
    checkpoint: Path = Field(description="Checkpoint directory (config.json and *.safetensors), relative to "
                                         "model.yaml. Hugging Face and DeepSeek release layouts are detected.")


class DiskTier(_Strict):
    path: Path = Field(description="Directory for saved sessions, relative to model.yaml.")
    size: ByteSize = Field(description="Bytes it may hold, e.g. 50GiB.")


class Tiers(_Strict):
    device: ByteSize | None = Field(None, description="The fastest pool (GPU memory, or the hot pool on a CPU), "
                                                      "e.g. 512MiB. Unlimited when absent.")
    host: ByteSize | None = Field(None, description="Host memory for CSA pages that do not fit the device, e.g. 8GiB.")
    disk: DiskTier | None = Field(None, description="Where saved sessions go.")


class KVSection(_Strict):
    max_context: int = Field(4096, ge=1, description="Tokens one session can hold; sizes every KV / compressor "
                                                     "state slot. Longer prompts are refused at run time.")
    concurrency: int = Field(1, ge=1, description="Sequences in flight at once; the tiers are planned for all of them.")
    page_tokens: int = Field(64, ge=1, description="Tokens per KV page moved between tiers.")
    tiers: Tiers = Field(Tiers(), description="Tier budgets.")
    prefill_chunk: int = Field(256, ge=1, description="Most tokens one forward step takes; longer prompts are fed "
                                                      "in chunks. Sizes the activation arena with the memory plan.")


class CalibrationSection(_Strict):
    data: Path = Field(description="Calibration text: a text file, or JSONL with `text` or `token_ids` per line; "
                                   "relative to model.yaml.")
    samples: int = Field(32, ge=1, description="Windows sampled (deterministically) from the data.")
    seq_len: int = Field(256, ge=2, description="Tokens per calibration window.")
    seed: int = Field(0, description="Seed of the window sampling.")
    min_expert_tokens: int = Field(16, ge=0, description="Experts routed fewer calibration tokens are flagged.")
    heldout: Path | None = Field(None, description="Held-out text for the report (not used for calibration). "
                                                   "Default: the last 10% of `data`, which calibration then skips.")
    heldout_samples: int = Field(8, ge=1, description="Held-out windows in the report.")
    heldout_seq_len: int | None = Field(None, ge=2, description="Tokens per held-out window, for the error-vs-position "
                                                                 "sweep. Default: min(4 x seq_len, kv.max_context).")


class Thresholds(_Strict):
    max_kl: float | None = Field(None, ge=0, description="Mean KL(reference || compiled) per held-out token.")
    min_top1: float | None = Field(None, ge=0, le=1, description="Share of tokens whose top-1 prediction agrees.")
    max_ppl_increase: float | None = Field(None, ge=0, description="Relative held-out perplexity increase (0.01 = 1%).")
    min_sqnr_db: float | None = Field(None, description="Lowest allowed weight or activation SQNR of any quantized layer.")


class ReportSection(_Strict):
    thresholds: Thresholds = Field(Thresholds(), description="Drift gates checked at the end of compile.")


class PassSpec(_Strict):
    name: str
    options: dict = {}


class Spec(_Strict):
    model: ModelSection
    target: Literal[tuple(TARGETS)] = Field("torch", description="Kernel target: torch (the reference kernels, any "
                                                                 "device), triton (GPU kernels) or tvm (CPU kernels).")
    tune: Literal["auto", "on", "off"] = Field("auto", description="triton: time candidate launch configs on the "
                                               "compiling machine's GPU and record the fastest in the artifact (auto: "
                                               "when it has one; on: require one; off: record the heuristics).")
    tvm_target: dict[str, Any] | None = Field(None, description="tvm: the LLVM target as a dict, e.g. {kind: llvm, "
                                                 "mcpu: znver4, num-cores: 16} (default: this machine's CPU).")
    passes: list[Any] = Field([], description="Passes in order: a name, or {name: {options}}.")
    kv: KVSection = KVSection()
    calibration: CalibrationSection | None = Field(None, description="Calibration data; enables the report.")
    report: ReportSection | None = Field(None, description="Report settings: drift gates (needs calibration).")

    @field_validator("tune", mode="before")
    @classmethod
    def _yaml_booleans(cls, v):
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # YAML reads on/off as booleans

    def pass_specs(self) -> list[PassSpec]:
        out = []
        for p in self.passes:
            name, opts = (p, {}) if isinstance(p, str) else next(iter(p.items()))
            out.append(PassSpec(name=name, options=opts or {}))
        return out


def _found(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({type(value).__name__})"


def _section_model(ann) -> type[BaseModel] | None:
    """The pydantic model of a field annotation (also through `Model | None`)."""
    for t in (ann, *typing.get_args(ann)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = _section_model(getattr(field, "annotation", None))
        if model is None:
            return []
    return list(model.model_fields)


EXPECTED = {"dict_type": "a mapping (key: value)", "model_type": "a mapping (key: value)", "list_type": "a list",
            "string_type": "a string", "int_type": "an integer", "int_parsing": "an integer",
            "int_from_float": "an integer", "bool_type": "true or false", "bool_parsing": "true or false",
            "float_type": "a number", "float_parsing": "a number", "path_type": "a path"}


def _message(err: dict, root: type[BaseModel], where: str = "") -> tuple[tuple, bool, str]:
    """-> (path, point at the key rather than the value, message) for one pydantic error."""
    loc = tuple(err["loc"])
    key = where + ".".join(str(p) for p in loc) or "(top level)"
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx", {})
    if kind == "extra_forbidden":
        allowed = _allowed_keys(root, loc[:-1])
        if not allowed:
            return loc, True, f"{where.rstrip('.') or 'this section'} takes no key {loc[-1]!r} (it has no options)"
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        section = where + ".".join(map(str, loc[:-1])) or "the top level"
        return loc, True, (f"unknown key {loc[-1]!r} in {section}; allowed: {', '.join(allowed)}"
                           + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    if kind == "missing":
        return loc[:-1], True, f"{key}: required key is missing"
    if kind == "literal_error":
        expected = f"one of {ctx['expected']}"
    elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        expected = f"a number {op} {next(iter(ctx.values()))}"
    else:
        expected = EXPECTED.get(kind, err["msg"].lower())
    return loc, False, f"{key}: found {_found(value)}; expected {expected}"


def _pos(positions: dict, loc: tuple, at_key: bool) -> Pos:
    while loc not in positions:
        loc = loc[:-1]
    return positions[loc][0 if at_key else 1]


def load_spec(path) -> tuple[Spec, Path]:
    """-> (validated spec, resolved checkpoint directory). Raises SpecError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(path, None, f"cannot read the spec: {e.strerror}") from None
    try:
        data, positions = load_with_positions(text)
    except YamlError as e:
        raise SpecError(path, e.pos, e.message) from None
    if not isinstance(data, dict):
        raise SpecError(path, Pos(1, 1), f"the spec must be a mapping with keys {', '.join(Spec.model_fields)}; "
                                         f"found {_found(data)}")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc, at_key, msg = _message(err, Spec)
            pos = _pos(positions, loc, at_key)
            problems.append((pos.line, pos.col, f"{path}:{pos.line}:{pos.col}: error: {msg}"))
        raise V4CError("\n".join(m for *_, m in sorted(problems))) from None
    _check_passes(spec, path, positions)
    if spec.report is not None and spec.calibration is None:
        raise SpecError(path, _pos(positions, ("report",), True),
                        "report: drift gates need calibration data; add a `calibration:` section")
    if spec.calibration is not None:
        for key in ("data", "heldout"):
            value = getattr(spec.calibration, key)
            if value is None:
                continue
            resolved = (path.parent / value).resolve()
            if not resolved.is_file():
                raise SpecError(path, _pos(positions, ("calibration", key), False),
                                f"calibration.{key}: {data['calibration'][key]!r} resolves to {resolved}, which is "
                                "not a file")
            setattr(spec.calibration, key, resolved)
    if spec.kv.tiers.disk is not None:
        spec.kv.tiers.disk.path = (path.parent / spec.kv.tiers.disk.path).resolve()
    ckpt = (path.parent / spec.model.checkpoint).resolve()
    if not ckpt.is_dir():
        raise SpecError(path, _pos(positions, ("model", "checkpoint"), False),
                        f"model.checkpoint: {data['model']['checkpoint']!r} resolves to {ckpt}, which "
                        f"{'is not a directory' if ckpt.exists() else 'does not exist'}; give the checkpoint "
                        "directory, relative to this file")
    return spec, ckpt


def _check_passes(spec: Spec, path: Path, positions: dict) -> None:
    for i, entry in enumerate(spec.passes):
        where = ("passes", i)
        ok = isinstance(entry, str) or (isinstance(entry, dict) and len(entry) == 1
                                        and isinstance(next(iter(entry.values())), dict | None))
        if not ok:
            raise SpecError(path, _pos(positions, where, False),
                            f"passes[{i}]: found {_found(entry)}; expected a pass name (`- dce`) or one pass "
                            "with its options (`- name: {option: value}`)")
    validated = []  # (name, options) of the passes before this one
    for i, p in enumerate(spec.pass_specs()):
        if p.name in PASSES and not PASSES[p.name].listable:
            raise SpecError(path, _pos(positions, ("passes", i), False),
                            f"passes[{i}]: {p.name!r} runs from the `calibration:` section of model.yaml; remove it "
                            "from passes")
        if p.name not in LISTABLE:
            hint = difflib.get_close_matches(p.name, LISTABLE, n=1)
            raise SpecError(path, _pos(positions, ("passes", i), False),
                            f"passes[{i}]: unknown pass {p.name!r}; allowed: {', '.join(LISTABLE)}"
                            + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        try:
            options = PASSES[p.name].options.model_validate(p.options)
        except ValidationError as e:
            loc, at_key, msg = _message(e.errors()[0], PASSES[p.name].options, f"passes[{i}].{p.name}.")
            raise SpecError(path, _pos(positions, ("passes", i, p.name) + loc, at_key), msg) from None
        check_order = PASSES[p.name].check_order
        if check_order is not None and (why := check_order(options, validated)) is not None:
            raise SpecError(path, _pos(positions, ("passes", i), False), f"passes[{i}]: {why}")
        validated.append((p.name, options))


def json_schema() -> dict:
    """The JSON Schema of model.yaml, with each registered pass's options."""
    schema = Spec.model_json_schema()
    listable = {name: PASSES[name] for name in LISTABLE}
    entries = [{"const": name, "description": d.summary} for name, d in listable.items()]
    entries += [{"type": "object", "additionalProperties": False, "minProperties": 1, "maxProperties": 1,
                 "properties": {name: {"anyOf": [d.options.model_json_schema(), {"type": "null"}],
                                       "description": d.summary}}} for name, d in listable.items()]
    schema["properties"]["passes"]["items"] = {"anyOf": entries}
    schema["properties"]["passes"].pop("default", None)
    schema["properties"]["passes"]["default"] = []
    schema["title"] = "v4c model.yaml"
    return schema

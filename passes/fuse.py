"""Kernel fusion: quantize a norm's output once, in the norm, for the FP8 projections that read it.

    %y = rms_norm(%x, @w) {eps}                      %yq, %ys = rms_norm_quant(%x, @w) {eps, group, scale_format}
    %a = linear_fp8(%y, @A, @A.scale) {act}     ->   %a = linear_fp8(%yq, @A, @A.scale, %ys) {act}
    %b = linear_fp8(%y, @B, @B.scale) {act}          %b = linear_fp8(%yq, @B, @B.scale, %ys) {act}

The rule applies where every reader of the norm's output is a `linear_fp8` with the same dynamic
activation quantization (group and scale format) reading it as x, and the output is not the
program's. The numbers do not change: each projection quantized its x with exactly these codes
and scales; now the norm writes them (one byte a channel instead of four, and one amax per group
instead of one per projection program). In V4 the rule takes the `q_a_norm` output (read by
`q_b_proj` and, in CSA layers, the indexer's `q_b_proj`) and an `input_layernorm` whose readers are
all FP8 (with the default fp8 skip list the compressor projections keep it unfused). Norms with
another reader (the router reads `post_attention_layernorm`) stay as they are.

Run it after `fp8` (before it there is no `linear_fp8` to fuse into). The Triton target runs
`rms_norm_quant` as one kernel and the GEMM reads the codes; the TVM target runs both steps as the
runtime's torch kernels (it has no kernel for them), so leave this pass out of CPU builds.
"""

from pydantic import BaseModel, ConfigDict, Field

from v4c.ir import Function, Instr, Module, ParamRef, Value
from v4c.ir.ops import OPS


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    norm_quant: bool = Field(True, description="rms_norm + the dynamic FP8 activation quantization of the "
                                               "linear_fp8 ops that read it -> one rms_norm_quant")


def check_order(options: Options, earlier: list) -> str | None:
    """Why `fuse` listed after `earlier` [(name, options)] would find nothing to fuse, or None."""
    if not options.norm_quant:
        return None
    fp8 = [o for name, o in earlier if name == "fp8"]
    if not fp8:
        return "fuse rewrites the FP8 projections (linear_fp8) that the fp8 pass makes: list it after fp8"
    if fp8[-1].fake_quant or fp8[-1].activations.mode != "dynamic":
        return ("fuse quantizes a norm's output for dynamic FP8 activations, and the fp8 pass before it has "
                f"activations mode {fp8[-1].activations.mode!r}{' with fake_quant' if fp8[-1].fake_quant else ''}: "
                "nothing would fuse; remove fuse or use dynamic activations")
    return None


def _readers(body: list[Instr]) -> dict[str, list[tuple[Instr, int]]]:
    """value name -> (instruction, operand index) of each use."""
    uses: dict[str, list[tuple[Instr, int]]] = {}
    for ins in body:
        for i, o in enumerate(ins.operands):
            if not isinstance(o, ParamRef):
                uses.setdefault(o.name, []).append((ins, i))
    return uses


def _shared_act(uses: list[tuple[Instr, int]]) -> dict | None:
    """The dynamic act all of a value's readers apply, if every reader is a linear_fp8 reading it as x."""
    acts = [ins.attrs["act"] for ins, i in uses if ins.op == "linear_fp8" and i == 0 and len(ins.operands) == 3]
    if not uses or len(acts) != len(uses) or acts[0].get("mode") != "dynamic":
        return None
    return acts[0] if all(a == acts[0] for a in acts) else None


def _fresh(names: set[str], base: str) -> str:
    n = 0
    while f"{base}{n}" in names:
        n += 1
    names.add(f"{base}{n}")
    return f"{base}{n}"


def run(m: Module, options: Options, progress=None) -> Module:
    body = list(m.func.body)
    fused = 0
    if options.norm_quant:
        uses = _readers(body)
        names = {v.name for v in m.func.inputs} | {r.name for ins in body for r in ins.results}
        replace: dict[int, Instr] = {}  # id(instr) -> its rewrite
        for ins in body:
            if ins.op != "rms_norm" or ins.results[0].name == m.func.output.name:
                continue
            act = _shared_act(uses.get(ins.results[0].name, []))
            if act is None:
                continue
            attrs = {**ins.attrs, "group": act["group"], "scale_format": act.get("scale_format", "fp32")}
            types = [m.params[o.name] if isinstance(o, ParamRef) else o.type for o in ins.operands]
            codes_t, scales_t = OPS["rms_norm_quant"].infer(types + [None] * (2 - len(types)), [], attrs)
            base = ins.results[0].name
            codes, scales = Value(_fresh(names, f"{base}.q"), codes_t), Value(_fresh(names, f"{base}.s"), scales_t)
            replace[id(ins)] = Instr("rms_norm_quant", list(ins.operands), [codes, scales], attrs)
            for reader, _ in uses[base]:
                replace[id(reader)] = Instr(reader.op, [codes, *reader.operands[1:], scales], reader.results,
                                            dict(reader.attrs), list(reader.state))
            fused += 1
        body = [replace.get(id(ins), ins) for ins in body]
    out = m.replace(func=Function(m.func.inputs, body, m.func.output))
    out.counters["fuse"] = {"norm_quant": fused}
    return out

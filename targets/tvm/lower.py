"""Lower an IR module for the `tvm` target (CPUs).

The program is the torch target's (same steps, same kernel names). Every step whose op has a TVM
kernel gets compiled functions for its static shapes, one per token-count variant (`VARIANTS`):
a call with M tokens runs the largest variants that fit, in row blocks (runtime/tvm_kernels.py).
Steps with the same op, shapes, formats and attributes share their functions. All functions go
into ONE shared library, `kernels/tvm/kernels.so`, next to `kernels/tvm/kernels.json` (the step
table, the target, the CPU features the code may use, and the ops that run as torch kernels, with
the reason).
"""

import json
import platform
import tempfile
from pathlib import Path

from v4c.ir import Module
from v4c.passes import fuse, memory_plan
from v4c.runtime.errors import V4CError
from v4c.runtime.tvm_kernels import SPEC, SPEC_FORMAT, cpu_features
from v4c.targets import Lowered
from v4c.targets.torch import lower as torch_lower

LIBRARY = "kernels/tvm/kernels.so"
VARIANTS = (1, 4, 16)  # tokens per compiled call: decode of 1 / 4 sequences, and blocks of 16 for prefill
GEMMS = ("linear", "linear_fp8", "grouped_linear", "grouped_linear_fp8")
EXPERTS = ("moe_experts", "moe_experts_q")
# x86 feature flags (as /proc/cpuinfo names them) that LLVM may use when compiling for the host CPU
ISA_FLAGS = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "avx512f", "avx512dq", "avx512bw",
             "avx512vl", "avx512cd", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx512vbmi", "asimd", "sve")
WHY_TORCH = "no TVM kernel for this op yet (it runs as the runtime's torch kernel)"


def _gemm_signature(program, step) -> tuple | None:
    """(builder name, kwargs) identifying one linear-family step's kernel; None if the step's
    weights are not a plain 2-D matrix this target compiles."""
    weight = program.params[step.inputs[1][1:]]
    if len(weight.shape) != 2:
        return None
    n, k = weight.shape
    groups = step.attrs.get("groups", 1)
    if step.kernel in ("linear", "grouped_linear"):
        dtype = {"f32": "float32", "bf16": "bfloat16"}.get(weight.dtype)
        if dtype is None:
            return None
        return ("dense", {"n": n, "k": k, "groups": groups, "weight_dtype": dtype})
    if weight.dtype != "f8e4m3":
        return None
    scale = program.params[step.inputs[2][1:]]
    fmt = "ue8m0" if scale.dtype == "f8e8m0" else "fp32"
    return ("fp8", {"n": n, "k": k, "groups": groups, "block": tuple(step.attrs["block"]), "scale_format": fmt,
                    "act": json.dumps(step.attrs["act"], sort_keys=True)})


def _fp8_kwargs(n, k, scale_dtype: str, block, act) -> dict:
    return {"n": n, "k": k, "groups": 1, "block": tuple(block), "scale_format": "ue8m0" if scale_dtype == "f8e8m0"
            else "fp32", "act": json.dumps(act or {"mode": "none"}, sort_keys=True)}


def _expert_signatures(program, step) -> tuple[tuple, tuple] | None:
    """(gate_up, down) kernel signatures of a routed-experts step (grouped per expert); None if not compiled."""
    params = [program.params[a[1:]] for a in step.inputs[3:]]
    a = step.attrs
    if step.kernel == "moe_experts":
        gate_up, down = params
        dtype = {"f32": "float32", "bf16": "bfloat16"}.get(gate_up.dtype)
        if dtype is None or a.get("act_in") or a.get("act_mid"):
            return None
        _, i2, d = gate_up.shape
        return (("dense", {"n": i2, "k": d, "groups": 1, "weight_dtype": dtype}),
                ("dense", {"n": d, "k": i2 // 2, "groups": 1, "weight_dtype": dtype}))
    gate_up, gu_scale, down, down_scale = params
    if a.get("format") == "fp4":  # e2m1 two per byte, per-32 UE8M0 scales: [E, rows, cols / 2]
        _, i2, dh = gate_up.shape
        act_in, act_mid = (json.dumps(a.get(k) or {"mode": "none"}, sort_keys=True) for k in ("act_in", "act_mid"))
        return (("fp4", {"n": i2, "k": 2 * dh, "act": act_in}), ("fp4", {"n": 2 * dh, "k": i2 // 2, "act": act_mid}))
    if a.get("format") != "fp8":
        return None
    _, i2, d = gate_up.shape
    return (("fp8", _fp8_kwargs(i2, d, gu_scale.dtype, a["block"], a.get("act_in"))),
            ("fp8", _fp8_kwargs(d, i2 // 2, down_scale.dtype, a["down_block"], a.get("act_mid"))))


def _fused_experts(program, step, name: str):
    """The one-call experts kernel of a routed-experts step (few tokens), or None (FP4, odd sizes)."""
    from .experts import experts_gemv
    params = [program.params[a[1:]] for a in step.inputs[3:]]
    a = step.attrs
    topk = program.memory["buffers"][str(step.inputs[1])]["shape"][-1]
    _, i2, d = params[0].shape
    if step.kernel == "moe_experts":
        dtype = {"f32": "float32", "bf16": "bfloat16"}.get(params[0].dtype)
        if dtype is None or params[1].dtype != params[0].dtype:
            return None
        fmts = ("dense", dtype), ("dense", dtype)
    elif a.get("format") == "fp8":
        fmts = (("fp8", tuple(a["block"]), "ue8m0" if params[1].dtype == "f8e8m0" else "fp32"),
                ("fp8", tuple(a["down_block"]), "ue8m0" if params[3].dtype == "f8e8m0" else "fp32"))
    else:
        return None
    try:
        return experts_gemv(d, i2 // 2, topk, gate_up=fmts[0], down=fmts[1], act_in=a.get("act_in"),
                            act_mid=a.get("act_mid"), limit=a.get("limit"), name=name)
    except ValueError:
        return None


def _shape(program, slot) -> list:
    """A value's shape ("B", "S" symbolic): its planned buffer's, or a view's own."""
    spec = program.memory["buffers"].get(str(slot))
    if spec is not None:
        return spec["shape"]
    step = next(s for s in program.steps if slot in s.outputs)
    if step.kernel != "reshape":
        raise ValueError(f"value {slot} has no planned buffer")
    return step.attrs["shape"]


def _router_kwargs(program, step, target) -> dict | None:
    weight = program.params[step.inputs[1][1:]]
    if weight.dtype not in ("f32", "bf16") or step.attrs.get("shared"):  # (shared: the triton target's rewrite)
        return None
    e, d = weight.shape
    kw = {"dim": d, "experts": e, "score_func": step.attrs["score_func"], "scale": step.attrs["scale"],
          "weight_dtype": {"f32": "float32", "bf16": "bfloat16"}[weight.dtype]}
    if step.kernel == "route_topk":
        bias = program.params[step.inputs[2][1:]]
        return {**kw, "k": step.attrs["k"]} if bias.dtype == "f32" else None
    vocab, k = program.params[step.inputs[2][1:]].shape
    return {**kw, "k": k, "vocab": vocab}


def _index_kwargs(program, step, target) -> dict | None:
    _, _, heads, dim = _shape(program, step.inputs[0])
    a = step.attrs
    if a.get("key_format", "f32") not in ("f32", "bf16", "fp8_block"):
        return None
    return {"heads": heads, "dim": dim, "topk": a["topk"], "rate": a["rate"], "key_format": a.get("key_format", "f32"),
            "score_scale": a["score_scale"], "weight_scale": a["weight_scale"]}


def _attention_kwargs(program, step, target) -> dict:
    _, _, heads, dim = _shape(program, step.inputs[0])
    a = step.attrs
    mode = "sliding" if len(step.state) == 1 else "csa" if len(step.inputs) > 3 else "hca"
    return {"heads": heads, "dim": dim, "window": a["window"], "kv_format": a.get("kv_format", "f32"),
            "rope_dim": a.get("rope_dim", 0), "mode": mode, "rate": a.get("rate", 0), "scale": a["scale"],
            "topk": _shape(program, step.inputs[3])[-1] if mode == "csa" else 0, "cores": target.get("num-cores")}


def _f32_params(program, step) -> bool:
    return all(program.params[a[1:]].dtype == "f32" for a in step.inputs if isinstance(a, str))


def _rms_kwargs(program, step, target) -> dict | None:
    if not _f32_params(program, step):
        return None
    return {"d": _shape(program, step.inputs[0])[-1], "eps": step.attrs["eps"], "weight": len(step.inputs) > 1}


def _add_kwargs(program, step, target) -> dict | None:  # no broadcasting
    a, b = (_shape(program, x) for x in step.inputs)
    return {} if a == b else None


def _rope_kwargs(program, step, target) -> dict | None:
    shape, inv = _shape(program, step.inputs[0]), program.params[step.inputs[2][1:]]
    if len(shape) not in (3, 4) or inv.dtype != "f32" or step.inputs[1] != program.inputs["positions"]:
        return None
    return {"heads": shape[2] if len(shape) == 4 else 1, "d": shape[-1], "rope_dim": 2 * inv.shape[0],
            "inverse": step.attrs.get("inverse", False), "scale": step.attrs.get("scale", 1.0)}


def _hc_kwargs(program, step, target) -> dict | None:
    if not _f32_params(program, step):
        return None
    shape = _shape(program, step.inputs[0 if step.kernel != "hc_post" else 1])
    hc, d = (step.attrs["hc"], shape[-1]) if step.kernel == "hc_expand" else shape[-2:]
    return {"hc": hc, "d": d, **{k: v for k, v in step.attrs.items() if k in ("iters", "eps", "norm_eps")}}


def _compress_kwargs(program, step, target) -> dict | None:
    norm, inv = (program.params[a[1:]] for a in step.inputs[3:5])
    a = step.attrs
    if not _f32_params(program, step) or a.get("kv_format", "f32") == "fp4_block":
        return None
    return {"d": norm.shape[0], "rate": a["rate"], "rope_dim": 2 * inv.shape[0], "overlap": a["overlap"],
            "eps": a["eps"], "rope_scale": a.get("rope_scale", 1.0), "kv_format": a.get("kv_format", "f32")}


def _embed_kwargs(program, step, target) -> dict | None:
    weight = program.params[step.inputs[1][1:]]
    vocab, dim = weight.shape
    if step.kernel == "embed":
        dtype = {"f32": "float32", "bf16": "bfloat16"}.get(weight.dtype)
        return {"dim": dim, "vocab": vocab, "weight_dtype": dtype} if dtype else None
    scale = program.params[step.inputs[2][1:]]
    return {"dim": dim, "vocab": vocab, "block": tuple(step.attrs["block"]),
            "scale_format": "ue8m0" if scale.dtype == "f8e8m0" else "fp32"}


# op -> (kernel module, builder, its keyword arguments for a step (program, step, target), or None: the
# step runs as torch)
OP_KERNELS = {
    "embed": ("compress", "embed", _embed_kwargs),
    "embed_fp8": ("compress", "embed_fp8", _embed_kwargs),
    "compress": ("compress", "compress", _compress_kwargs),
    "rms_norm": ("rowwise", "rms_norm", _rms_kwargs),
    "add": ("rowwise", "add", _add_kwargs),
    "swiglu": ("rowwise", "swiglu", lambda program, step, target: {"limit": step.attrs.get("limit")}),
    "rope": ("rowwise", "rope", _rope_kwargs),
    "hc_expand": ("rowwise", "hc_expand", _hc_kwargs),
    "hc_pre": ("rowwise", "hc_pre", _hc_kwargs),
    "hc_post": ("rowwise", "hc_post", _hc_kwargs),
    "hc_head": ("rowwise", "hc_head", _hc_kwargs),
    "attention": ("attention", "attention_kernel", _attention_kwargs),
    "route_topk": ("select", "route_topk", _router_kwargs),
    "route_hash": ("select", "route_hash", _router_kwargs),
    "index_topk": ("select", "index_topk", _index_kwargs),
}


def _op_builder(kernel: str, kwargs: dict, name: str):
    import importlib
    module, builder, _ = OP_KERNELS[kernel]
    return getattr(importlib.import_module(f"{__package__}.{module}"), builder)(**kwargs, name=name)


def _builder(kind: str, kwargs: dict, m: int, name: str):
    from . import gemv
    kw = dict(kwargs)
    if kind == "dense":
        return gemv.dense_gemv(kw.pop("n"), kw.pop("k"), m, name=name, **kw)
    kw["act"] = json.loads(kw["act"])
    if kind == "fp4":
        return gemv.fp4_gemv(kw.pop("n"), kw.pop("k"), m, name=name, **kw)
    return gemv.fp8_gemv(kw.pop("n"), kw.pop("k"), m, name=name, **kw)


def host_target(spec_target=None) -> dict:
    from . import gemv
    return spec_target or gemv.host_target()


def lower(module: Module, *, prefill_chunk: int, target=None, progress=None) -> Lowered:
    from . import gemv
    import tvm

    # the fuse pass's e4m3 codes: these kernels take float inputs and quantize them in a first stage of their own
    # (and they have no fused norm + RoPE, add + hc_post, hc_post + hc_pre (+ norm), SwiGLU + GEMM)
    module, unfused = fuse.unfuse(module)
    if unfused:
        module = memory_plan.run(module, memory_plan.Options())
        if progress:
            progress(f"tvm: {unfused} fusions of the fuse pass (rms_norm_quant, rms_norm_rope, hc_post adding, "
                     "hc_post_pre(_quant), swiglu_linear_fp8) back to the plain ops: these kernels quantize their own input")
    program = torch_lower(module, prefill_chunk=prefill_chunk)
    tgt = host_target(target)
    steps, torch_ops, funcs, names = {}, {}, [], {}
    def compiled(sig) -> dict[str, str]:
        """The variant names of one kernel signature, building them the first time."""
        key = json.dumps([sig[0], sig[1]], sort_keys=True, default=list)
        if key not in names:
            base = f"v4c_{len(names)}_{sig[0]}"
            built = {m: _builder(*sig, m, f"{base}_m{m}") for m in VARIANTS}  # ValueError: not covered
            funcs.extend(built.values())
            names[key] = {str(m): f"{base}_m{m}" for m in VARIANTS}
        return names[key]

    for i, step in enumerate(program.steps):
        if step.kernel == "reshape":
            continue
        try:
            if step.kernel in GEMMS and (sig := _gemm_signature(program, step)) is not None:
                n, groups = sig[1]["n"], sig[1]["groups"]
                steps[str(i)] = {"call": "gemm", "n": n // groups, "k": sig[1]["k"], "groups": groups,
                                 "variants": compiled(sig)}
                continue
            if step.kernel in EXPERTS and (sigs := _expert_signatures(program, step)) is not None:
                steps[str(i)] = {"call": "experts", "d": sigs[1][1]["n"], "i": sigs[1][1]["k"],
                                 "gate_up": compiled(sigs[0]), "down": compiled(sigs[1])}
                if (fused := _fused_experts(program, step, f"v4c_experts_{i}")) is not None:
                    funcs.append(fused)
                    steps[str(i)]["fused"] = f"v4c_experts_{i}"
                continue
            if step.kernel in OP_KERNELS and (kw := OP_KERNELS[step.kernel][2](program, step, tgt)) is not None:
                key = json.dumps([step.kernel, kw], sort_keys=True)
                if key not in names:
                    names[key] = f"v4c_{len(names)}_{step.kernel}"
                    funcs.append(_op_builder(step.kernel, kw, names[key]))
                steps[str(i)] = {"call": "op", "op": step.kernel, "fn": names[key]}
                continue
        except ValueError as e:  # a shape / block the kernels do not cover: this step runs as torch
            torch_ops.setdefault(step.kernel, f"not compiled: {e}")
            continue
        torch_ops.setdefault(step.kernel, "weights in a format this target does not compile"
                             if step.kernel in GEMMS + EXPERTS else "operands in a form its TVM kernel does not take "
                             "(a router weight that is not fp32 / bf16, FP4 indexer keys)" if step.kernel in OP_KERNELS
                             else WHY_TORCH)
    if progress:
        progress(f"tvm: compiling {len(funcs)} kernels for {len(steps)} steps ({tgt.get('mcpu', tgt)})")
    with tempfile.TemporaryDirectory(prefix="v4c-tvm-") as tmp:  # the library's bytes go into the artifact
        lib_path = Path(tmp) / "kernels.so"
        try:
            gemv.build_library(funcs, lib_path, target=tgt)
        except Exception as e:
            raise V4CError(f"target: tvm: compiling the kernels failed ({type(e).__name__}: {e})") from None
        library = lib_path.read_bytes()
    have = cpu_features()
    from tvm.target import codegen
    triple = tgt.get("mtriple") or codegen.llvm_get_system_triple()
    spec = {"format": SPEC_FORMAT, "tvm": tvm.__version__, "library": LIBRARY, "target": tgt, "triple": triple,
            "machine": platform.machine(), "cpu_features": sorted(f for f in ISA_FLAGS if f in have),
            "torch_ops": torch_ops, "steps": steps, "unfused_ops": unfused}
    try:
        import tvm_ffi
        spec["tvm_ffi"] = tvm_ffi.__version__
    except ImportError:
        pass
    files = {LIBRARY: library, SPEC: (json.dumps(spec, indent=1, sort_keys=True) + "\n").encode()}
    manifest = {"toolchain": {"tvm": tvm.__version__, "llvm": codegen.llvm_version_major()},
                "tvm": {"target": tgt, "triple": triple, "machine": spec["machine"], "kernels": len(funcs),
                        "tvm_steps": len(steps), "torch_ops": sorted(torch_ops)}}
    return Lowered(program, files, manifest, module=module if unfused else None)

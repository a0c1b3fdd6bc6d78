"""Kernel set of a `tvm` artifact: compiled CPU kernels in one shared library, loaded with
`tvm_ffi` alone (this module never imports `tvm`).

The artifact carries `kernels/tvm/kernels.so` and `kernels/tvm/kernels.json`:

    {"format": 1, "tvm": "0.27.0", "library": "kernels/tvm/kernels.so",
     "target": {"kind": "llvm", "mcpu": "znver4", ...}, "triple": "x86_64-...-linux-gnu", "machine": "x86_64",
     "cpu_features": ["avx2", "avx512f", ...],            # what the code was compiled to use
     "torch_ops": {op: why it runs as the torch kernel},
     "steps": {"12": {"call": "gemm", "n": 1024, "k": 384, "groups": 1,
                      "variants": {"1": "fn name", "4": ..., "16": ...}},
               "30": {"call": "experts", "d": 1024, "i": 512, "gate_up": {variants}, "down": {variants},
                      "fused": "fn name"}}}          # fused: the few-token kernel (optional)

Kernels have static shapes; a step has variants by tokens per call, and a call with M tokens runs
the largest variants that fit, in row blocks (37 tokens with variants 1/4/16: 16 + 16 + 4 + 1).

A library built for CPU features this machine lacks, or for another architecture, is refused at
load with the reason and how to rebuild; so is one that fails to load (an ABI mismatch). Steps
without a kernel run as the runtime's torch kernel and are reported, as with the triton target.
"""

import hashlib
import json
import os
import platform
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import ArtifactError
from .kernels.basic import swiglu
from .kernels import KERNELS
from .kernelset import ArtifactKernels, cache_root
from .program import Step

SPEC = "kernels/tvm/kernels.json"
SPEC_FORMAT = 1
REBUILD = ("rebuild the artifact for this machine (v4c compile with target: tvm on it, or set tvm.target in "
           "model.yaml to this CPU's features), or run it with --kernels torch")


def cpu_features() -> set[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return set()
    for line in info.read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def check_machine(spec: dict, label: str) -> None:
    """Refuse a library this CPU cannot run, saying why."""
    machine = platform.machine()
    if spec.get("machine") and spec["machine"] != machine:
        raise ArtifactError(f"{label}: its TVM kernels were compiled for {spec['machine']}; this machine is "
                            f"{machine}: {REBUILD}")
    have = cpu_features()
    missing = sorted(set(spec.get("cpu_features", [])) - have) if have else []
    if missing:
        raise ArtifactError(f"{label}: its TVM kernels were compiled for {spec.get('target', {}).get('mcpu', '?')} and "
                            f"use CPU features this machine lacks ({', '.join(missing)}): {REBUILD}")


def _library_path(store, rel: str, sha256: str) -> Path:
    """A file path for the library: in place for a directory artifact, else extracted once to the cache."""
    root = getattr(store, "root", None)
    if root is not None:
        return Path(root) / rel
    dest = cache_root() / "tvm-kernels" / f"{sha256[:32]}.so"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(store.read(rel))
        os.replace(tmp, dest)
    return dest


def _arg(t: torch.Tensor) -> torch.Tensor:
    """Tensors as the kernels take them: FP8 / UE8M0 / packed FP4 bytes as uint8, everything contiguous."""
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.int8):
        t = t.view(torch.uint8)
    return t.contiguous()


def _blocks(m: int, sizes: list[int]) -> list[tuple[int, int]]:
    """(start, variant size) row blocks covering m rows; `sizes` in decreasing order."""
    out, start = [], 0
    for size in sizes:  # largest first
        while m - start >= size:
            out.append((start, size))
            start += size
    if start != m:
        raise ValueError(f"no kernel variant covers {m - start} remaining rows (variants {sorted(sizes)})")
    return out


class _Variants:
    """One kernel's compiled token-count variants: rows [M, ...] -> fp32 [M, ..., N] in row blocks."""

    def __init__(self, lib, variants: dict[str, str], n: int):
        self.fns, self.n = {int(m): lib[name] for m, name in variants.items()}, n
        self.sizes = sorted(self.fns, reverse=True)

    def __call__(self, rows: torch.Tensor, *weights) -> torch.Tensor:
        out = torch.empty(*rows.shape[:-1], self.n, dtype=torch.float32)
        args = [_arg(w) for w in weights]
        for start, size in _blocks(rows.shape[0], self.sizes):
            self.fns[size](rows[start:start + size], *args, out[start:start + size])
        return out

    def entries(self, rows: torch.Tensor, weights: list, out: torch.Tensor) -> list[tuple]:
        """The calls of `self(rows, *weights)` writing into `out`, as plan entries (fixed tensors)."""
        args = [_arg(w) for w in weights]
        return [(self.fns[size], (rows[start:start + size], *args, out[start:start + size]), {})
                for start, size in _blocks(rows.shape[0], self.sizes)]


def _fixed_f32(*tensors) -> bool:
    """Tensors a compiled kernel can read or write in place: contiguous fp32 on the CPU."""
    return all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu" for t in tensors)


class _Gemm:
    """One linear-family step: x [..., (G,) K] -> fp32 [..., (G,) N] through the step's variants."""

    def __init__(self, lib, entry: dict):
        self.k, self.groups = entry["k"], entry.get("groups", 1)
        self.run = _Variants(lib, entry["variants"], entry["n"])

    def __call__(self, x, *weights, **_attrs):
        g = self.groups
        lead = x.shape[:-2] if g > 1 else x.shape[:-1]
        inner = (g, self.k) if g > 1 else (self.k,)
        out = self.run(x.reshape(-1, *inner).float().contiguous(), *weights)
        return out.view(*lead, *inner[:-1], self.run.n)

    def bind(self, inputs: list, outs: list, attrs: dict) -> list[tuple] | None:
        x, out = inputs[0], outs[0]
        if not _fixed_f32(x, out):
            return None
        inner = (self.groups, self.k) if self.groups > 1 else (self.k,)
        rows = x.view(-1, *inner)
        return self.run.entries(rows, inputs[1:], out.view(rows.shape[0], *inner[:-1], self.run.n))


class _Experts:
    """Routed experts (moe_experts / moe_experts_q) with compiled gate_up and down projections, in
    the reference's order (runtime/kernels/moe.py run_experts: experts ascending, index_add_); the
    activation quantization of `act_in` / `act_mid` is fused into the projections."""

    def __init__(self, lib, entry: dict):
        self.gate_up = _Variants(lib, entry["gate_up"], 2 * entry["i"])
        self.down = _Variants(lib, entry["down"], entry["d"])
        self.fused = lib[entry["fused"]] if entry.get("fused") else None  # targets/tvm/experts.py

    def bind(self, inputs: list, outs: list, attrs: dict) -> list[tuple] | None:
        """Calls with at most one (token, slot) pair per expert run as the one fused kernel (each pair
        reads its expert's weights); larger ones group tokens per expert (__call__)."""
        x, weights, idx, gate_up = inputs[:4]
        if self.fused is None or not _fixed_f32(x, weights, outs[0]) or idx.dtype != torch.int64 \
                or not idx.is_contiguous() or idx.numel() > gate_up.shape[0]:
            return None
        d = x.shape[-1]
        args = (x.view(-1, d), weights.view(-1, weights.shape[-1]), idx.view(-1, idx.shape[-1]),
                *[_arg(w) for w in inputs[3:]], outs[0].view(-1, d))
        return [(self.fused, args, {})]

    def __call__(self, x, weights, idx, gate_up, *rest, limit=None, **_attrs):
        quantized = len(rest) == 3
        gu_scale, down, down_scale = rest if quantized else (None, rest[0], None)
        shape = x.shape
        x = x.float().reshape(-1, shape[-1])
        idx = idx.reshape(x.shape[0], -1)
        weights = weights.float().reshape(x.shape[0], -1)
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            token, slot = torch.where(idx == e)
            w1 = (gate_up[e], gu_scale[e]) if quantized else (gate_up[e],)
            gate, up = self.gate_up(x[token].contiguous(), *w1).chunk(2, dim=-1)
            mid = swiglu(gate, up, limit=limit).contiguous()
            y = self.down(mid, *((down[e], down_scale[e]) if quantized else (down[e],)))
            out.index_add_(0, token, y * weights[token, slot, None])
        return out.view(shape)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [M, C] (a view)."""
    return t.view(-1, t.shape[-1])


def _hc(t: torch.Tensor) -> torch.Tensor:
    """[..., hc, C] -> [M, hc, C] (a view)."""
    return t.view(-1, *t.shape[-2:])


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1)


def _heads(t: torch.Tensor) -> torch.Tensor:
    """RoPE operands as [B, S, H, D] (3-d: H = 1)."""
    return t if t.dim() == 4 else t.unsqueeze(2)


F32, I64 = torch.float32, torch.int64
# op -> (the compiled function's arguments from (inputs, outputs, attrs), the outputs' (shape, dtype) of an
# unplanned call from (inputs, attrs)). Stateful ops read attrs["state"] and attrs["pos0"].
OPS = {
    "embed": (lambda i, o, a: (i[0], i[1], o[0]), lambda i, a: [((*i[0].shape, i[1].shape[1]), F32)]),
    "embed_fp8": (lambda i, o, a: (i[0], _arg(i[1]), _arg(i[2]), o[0]),
                  lambda i, a: [((*i[0].shape, i[1].shape[1]), F32)]),
    # (kv, gate, ape, norm weight, inv_freq) with state (buf_kv, buf_gate[, ovl_kv, ovl_gate], entries)
    "compress": (lambda i, o, a: (*i, *a["state"], a["pos0"]), lambda i, a: []),
    "rms_norm": (lambda i, o, a: (_rows(i[0]), *i[1:], _rows(o[0])), lambda i, a: [(i[0].shape, F32)]),
    "add": (lambda i, o, a: (_flat(i[0]), _flat(i[1]), _flat(o[0])), lambda i, a: [(i[0].shape, F32)]),
    "swiglu": (lambda i, o, a: (_flat(i[0]), _flat(i[1]), _flat(o[0])), lambda i, a: [(i[0].shape, F32)]),
    "rope": (lambda i, o, a: (_heads(i[0]), i[1], i[2], _heads(o[0])), lambda i, a: [(i[0].shape, F32)]),
    "hc_expand": (lambda i, o, a: (_rows(i[0]), _hc(o[0])),
                  lambda i, a: [((*i[0].shape[:-1], a["hc"], i[0].shape[-1]), F32)]),
    "hc_pre": (lambda i, o, a: (_hc(i[0]), *i[1:4], _rows(o[0]), _rows(o[1]), _hc(o[2])),
               lambda i, a: [((*i[0].shape[:-2], i[0].shape[-1]), F32), (i[0].shape[:-1], F32),
                             ((*i[0].shape[:-1], i[0].shape[-2]), F32)]),
    "hc_post": (lambda i, o, a: (_rows(i[0]), _hc(i[1]), _rows(i[2]), _hc(i[3]), _hc(o[0])),
                lambda i, a: [(i[1].shape, F32)]),
    "hc_head": (lambda i, o, a: (_hc(i[0]), *i[1:4], _rows(o[0])),
                lambda i, a: [((*i[0].shape[:-2], i[0].shape[-1]), F32)]),
    "route_topk": (lambda i, o, a: (_rows(i[0]), i[1], i[2], _rows(o[0]), _rows(o[1])),
                   lambda i, a: [((*i[0].shape[:-1], a["k"]), F32), ((*i[0].shape[:-1], a["k"]), I64)]),
    "route_hash": (lambda i, o, a: (_rows(i[0]), i[1], i[2], i[3].reshape(-1), _rows(o[0]), _rows(o[1])),
                   lambda i, a: [((*i[0].shape[:-1], i[2].shape[1]), F32), ((*i[0].shape[:-1], i[2].shape[1]), I64)]),
    "index_topk": (lambda i, o, a: (i[0], i[1], a["state"][0], a["pos0"], o[0]),
                   lambda i, a: [((*i[0].shape[:2], a["topk"]), I64)]),
    # (q, kv, sinks[, selected]) with state (ring[, entries]): sliding / csa / hca (targets/tvm/attention.py)
    "attention": (lambda i, o, a: (*i[:3], *i[3:4], *a["state"], o[0], a["pos0"]),
                  lambda i, a: [(i[0].shape, F32)]),
}


class _Op:
    """One step through its compiled kernel (`OPS` adapts the arguments). Unplanned calls allocate the
    outputs; inputs the kernel cannot take (a tiered KV store) run the torch kernel, reported."""

    def __init__(self, owner: "TvmKernels", index: int, kernel: str, fn):
        self.owner, self.index, self.kernel, self.fn = owner, index, kernel, fn
        self.args, self.out_specs = OPS[kernel]

    def _takes(self, inputs, attrs) -> bool:
        tensors = [*inputs, *attrs.get("state", ())]
        return all(isinstance(t, torch.Tensor) and t.is_contiguous() and t.device.type == "cpu" for t in tensors
                   if not isinstance(t, (int, float)))

    def bind(self, inputs: list, outs: list, attrs: dict) -> list[tuple] | None:
        if not self._takes(inputs, attrs) or not all(o.is_contiguous() for o in outs):
            return None
        if "pos0" not in attrs:
            return [(self.fn, self.args(inputs, outs, attrs), {})]
        fn, adapt = self.fn, self.args

        def run(**kw):  # pos0 changes per call
            fn(*adapt(inputs, outs, kw))
        return [(run, (), attrs)]

    def __call__(self, *inputs, **attrs):
        if not self._takes(inputs, attrs):
            self.owner.fall_back(self.index, self.kernel, "its inputs are not contiguous CPU tensors (a tiered KV "
                                 "store?)")
            return KERNELS[self.kernel](*inputs, **attrs)
        outs = [torch.empty(shape, dtype=dtype) for shape, dtype in self.out_specs(inputs, attrs)]
        self.fn(*self.args(inputs, outs, attrs))
        return outs[0] if len(outs) == 1 else tuple(outs)


CALLS = {"gemm": _Gemm, "experts": _Experts}


class TvmKernels(ArtifactKernels):
    """Steps through the artifact's compiled kernels; the others (reported) as torch kernels."""

    name = "tvm"

    def __init__(self, lib, spec: dict, *, strict: bool = False):
        super().__init__(spec.get("torch_ops", {}), strict=strict)
        self.lib, self.spec = lib, spec

    def own(self, index: int, step: Step) -> Callable | None:
        entry = self.spec.get("steps", {}).get(str(index))
        if entry is None:
            return None
        if entry["call"] == "op" and entry.get("op") == step.kernel and step.kernel in OPS:
            return _Op(self, index, step.kernel, self.lib[entry["fn"]])
        if entry["call"] not in CALLS:
            raise ArtifactError(f"{SPEC}: step {index} uses call convention {entry['call']!r} ({entry.get('op')}), "
                                "which this runtime does not have (an artifact from a newer v4c?)")
        return CALLS[entry["call"]](self.lib, entry)

    def report(self) -> dict:
        by_op: dict[str, int] = {}
        for f in self.fallbacks:
            by_op[f["kernel"]] = by_op.get(f["kernel"], 0) + 1
        return {"kernels": self.name, "steps": self.steps(self.refused), "torch_steps_by_op": by_op,
                "fallbacks": list(self.fallbacks), "notes": []}


def tvm_kernels(store, manifest: dict, *, device: str = "cpu", strict: bool = False) -> TvmKernels:
    """The kernel set of a tvm artifact (its files already verified against the manifest)."""
    if device != "cpu":
        raise ArtifactError(f"this artifact's kernels are TVM CPU kernels; the session's device is {device} "
                            "(use --device cpu, or --kernels torch)")
    if not store.exists(SPEC):
        raise ArtifactError(f"{store.label}: a tvm artifact without {SPEC}")
    spec = json.loads(store.read(SPEC))
    if spec.get("format") != SPEC_FORMAT:
        raise ArtifactError(f"{SPEC}: format {spec.get('format')!r}; this runtime reads format {SPEC_FORMAT}")
    check_machine(spec, store.label)
    try:
        import tvm_ffi
    except ImportError:
        raise ArtifactError("this artifact's kernels are TVM kernels and apache-tvm-ffi is not installed: "
                            "pip install 'v4c[tvm]', or use --kernels torch") from None
    rel = spec["library"]
    sha = manifest["files"][rel]["sha256"] if rel in manifest.get("files", {}) else \
        hashlib.sha256(store.read(rel)).hexdigest()
    try:
        lib = tvm_ffi.load_module(str(_library_path(store, rel, sha)))
    except Exception as e:  # tvm_ffi raises its own error types for a library it cannot load
        raise ArtifactError(f"{store.label}: cannot load its TVM kernel library ({type(e).__name__}: {e}); "
                            f"{REBUILD}") from None
    built = spec.get("tvm_ffi")
    if built and built != getattr(tvm_ffi, "__version__", built):
        warnings.warn(f"v4c: the TVM kernels were built against tvm-ffi {built}; this machine has "
                      f"{tvm_ffi.__version__}", RuntimeWarning, stacklevel=2)
    return TvmKernels(lib, spec, strict=strict)

"""The triton target's kernels compiled for an H100 (sm_90a) on a machine without a GPU: what ptxas says.

Runs the real launchers (FP8 GEMM, sparse decode attention, the indexer's top-k) at the V4-Flash shapes of
`bench/triton_gpu.py`, and with --artifacts every kernel of a prefill and a decode step of the `small` /
`medium` triton artifacts, with CPU tensors, but every Triton launch is caught before it runs: the kernel
is specialized exactly as `JITFunction.run` does (argument types, 16-byte alignment, constexprs), then
compiled for `cuda:90` by Triton's own pipeline and its bundled ptxas. The launchers take their GPU
decisions as on an H100: `native_cvt` (hardware conversions, and with them bf16 attention dots) is true and
`sm_count` is 132 (the split heuristics); fp8 dots are allowed off a GPU already.
Nothing runs, so nothing is timed: this is for reading register pressure and code shape offline.

Per kernel: registers per thread, spill bytes (ptxas -v), dynamic shared memory, CTAs per SM that
registers and shared memory allow, and the SASS instruction mix (global loads by width, local-memory
spill traffic, tensor-core instructions, total); for a warp-specialized kernel also its warps in all (num_warps is
the default partition's), the partitions' register limits (setmaxnreg) and CTAs per SM at that many warps.

    .venv/bin/python bench/sm90_static.py [--only attention,indexer,compress,hyper,gemm,moe|none] [--batches 1,64]
        [--attention-configs JSON] [--indexer-configs JSON] [--gemm-configs JSON] [--moe-configs JSON]
        [--gemm-candidates] [--ws-candidates] [--moe-candidates fp8,fp4]
        [--artifacts small,medium]
        [--out bench/results/sm90_static.json]

The Triton here is the one this project installs (3.9); a lent GPU's image may carry another, whose
code differs: these numbers guide kernel work, they do not replace a profile on the GPU.
"""

import argparse
import functools
import json
import platform
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real JIT functions, compiled not interpreted

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile as triton_compile, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))  # gpu_semantics

from sm90_gemm_cases import (gemm_candidate_cases, gemm_cases, moe_candidate_cases, moe_cases,  # noqa: E402
                             ws_candidate_cases)

H100 = {"target": GPUTarget("cuda", 90, 32), "sms": 132, "regs_per_sm": 65536, "smem_per_sm": 228 * 1024,
        "max_threads_per_sm": 2048}
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SASS_CLASSES = {  # SASS opcode prefix -> what it is
    "LDG": "global loads", "LDGSTS": "async global->shared copies", "UTMALDG": "TMA loads", "STG": "global stores",
    "LDL": "spill loads", "STL": "spill stores",
    "LDS": "shared loads", "LDSM": "shared matrix loads", "STS": "shared stores", "HMMA": "mma (bf16/tf32)",
    "HGMMA": "wgmma (bf16/tf32)", "QGMMA": "wgmma (fp8)", "QMMA": "mma (fp8)", "IMMA": "mma (int)",
    "ATOMG": "global atomics", "MEMBAR": "memory fences (a release)", "CCTL": "L1 invalidations (an acquire)",
}


class Catch:
    """Replaces JITFunction.run: every launch is specialized and compiled for sm_90a, then skipped."""

    def __init__(self):
        self.target = H100["target"]
        self.backend = make_backend(self.target)
        # the options JITFunction.run adds before it compiles; a Triton without one (3.6 lacks the last) skips it
        known = self.backend.parse_options({}).__dict__
        self.run_defaults = {k: v for k, v in {"debug": False, "instrumentation_mode": "",
                                               "fpsan_homomorphic_casts": False}.items() if k in known}
        self.compiled: list[dict] = []
        self.cache: dict = {}

    def __enter__(self):
        self.saved = JITFunction.run
        catch = self

        def run(fn, *args, grid, warmup, **kwargs):
            catch.compile(fn, args, kwargs, grid)
        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        JITFunction.run = self.saved

    def compile(self, fn: JITFunction, args, kwargs, grid):
        kwargs = {**self.run_defaults, **kwargs}
        binder = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, specialization, options = binder(*args, **kwargs)
        key = (fn, str(specialization), str(options))
        if key not in self.cache:  # one compile per specialization, as Triton's own cache
            options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization,
                                                                  options)
            kernel = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=self.target,
                                    options=options.__dict__)
            consts = {k: (str(v) if not isinstance(v, (int, float, str, bool)) else v) for k, v in bound.items()
                      if signature.get(k) == "constexpr"}
            self.cache[key] = {"kernel": fn.__name__, "num_warps": options.num_warps, "num_stages": options.num_stages,
                               "constexprs": consts, **resources(kernel, options.num_warps)}
        grid = grid(bound) if callable(grid) else grid
        self.compiled.append({**self.cache[key], "grid": [int(g) for g in grid]})


def resources(kernel, warps: int) -> dict:
    """ptxas -v over the kernel's PTX (registers, spills), its dynamic shared memory, and its SASS mix."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(kernel.asm["ptx"])
        arch = f"sm_{H100['target'].arch}a"
        info = _run([_ptxas(), "-v", f"--gpu-name={arch}", str(ptx), "-o", str(Path(tmp) / "v.cubin")])
        cubin.write_bytes(kernel.asm["cubin"])
        sass = _run([str(BIN / "cuobjdump"), "-sass", str(cubin)])
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    spill_st, spill_ld = int(spills.group(1)), int(spills.group(2))
    shared = int(kernel.metadata.shared)
    threads = 32 * warps
    by_regs = H100["regs_per_sm"] // (max(regs, 1) * threads)
    by_smem = H100["smem_per_sm"] // shared if shared else by_regs
    mix = Counter()
    for op in re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass):
        mix["total"] += 1
        head = op.split(".")[0]
        if head in SASS_CLASSES:
            mix[op if head in ("LDG", "LDGSTS", "LDL", "STL") else head] += 1
    row = {"registers": regs, "spill_store_bytes": spill_st, "spill_load_bytes": spill_ld, "shared_bytes": shared,
           "ctas_per_sm": min(by_regs, by_smem, H100["max_threads_per_sm"] // threads),
           "sass": dict(sorted(mix.items()))}
    if "ttg.warp_specialize" in kernel.asm["ttgir"]:  # Triton split the loop among warp groups (setmaxnreg each)
        total = int(kernel.metadata.num_warps)  # the launch's warps: num_warps plus the partitions' own
        row.update(warp_specialized=True, total_warps=total, ctas_per_sm=min(
            H100["regs_per_sm"] // (max(regs, 1) * 32 * total), by_smem, H100["max_threads_per_sm"] // (32 * total)),
            setmaxnreg=[int(r) for r in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)",
                                                     kernel.asm["ptx"])])
    return row


@functools.cache
def _ptxas() -> str:
    """The bundled ptxas that reads the PTX version this Triton writes (the newer of the two)."""
    for name in ("ptxas-blackwell", "ptxas"):
        if (BIN / name).exists() and "release" in _run([str(BIN / name), "--version"]):
            return str(BIN / name)
    raise SystemExit(f"no ptxas under {BIN}")


def _commit() -> str:
    """The commit of the checkout the kernels were imported from, '+changes' when its kernel sources differ."""
    import v4c.targets.triton.kernels as kernels
    src = Path(kernels.__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True, text=True)
    head = head.stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], cwd=src).returncode
    return head + ("+changes" if dirty else "")


def _run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd[:2])} failed: {r.stderr.strip()[-500:]}")
    return r.stdout + r.stderr


def as_h100():
    """The launchers' device facts as on an H100 (they read them from the tensors' device, here the CPU), in
    every loaded kernel module: the target's, and an artifact's own copy of them (tests/gpu_semantics.py)."""
    import pytest
    from gpu_semantics import as_gpu

    import v4c.targets.triton.kernels  # noqa: F401
    as_gpu(pytest.MonkeyPatch(), sms=H100["sms"])  # never undone: this process only compiles for the H100


def attention_cases(extra: list[dict], batches: list[int]) -> list[dict]:
    from triton_gpu import ATTN

    from v4c.runtime.quant import encode_entries
    from v4c.targets.triton.kernels.attention import attention
    from v4c.targets.triton.kernels.attention_fused import attention_rope, norm_attention_rope
    h, d, rope, topk, cap, window = (ATTN[k] for k in ("heads", "dim", "rope", "topk", "entries", "window"))
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rope, 2) / rope)
    out = []
    for batch in batches:
        g = torch.Generator().manual_seed(0)
        q, kv, sinks = torch.randn(batch, 1, h, d), torch.randn(batch, 1, d), torch.randn(h)
        ring = encode_entries(torch.randn(batch, window - 1, d, generator=g), "fp8_split", rope)
        entries = encode_entries(torch.zeros(batch, cap, d), "fp8_split", rope)
        selected = torch.stack([torch.randperm(cap, generator=g)[:topk] for _ in range(batch)])[:, None]
        for cfg, pos0 in [({}, cap * 4 + 3)] + [(c, cap * 4 + 3) for c in extra] + [({}, torch.tensor([cap * 4 + 3]))]:
            where = " at a device position" if isinstance(pos0, torch.Tensor) else ""  # a decode step in a CUDA graph
            out.append({"case": f"attention CSA fp8_split batch={batch}{where}", "config": cfg,
                        "call": lambda cfg=cfg, pos0=pos0, a=(q, kv, sinks, selected, ring, entries): attention(
                            *a[:4], state=a[4:], pos0=pos0, window=window, rate=4, scale=d ** -0.5,
                            kv_format="fp8_split", rope_dim=rope, config=cfg)})
        # the fuse pass's attention_rope: the output's inverse RoPE in the launch, at a device position
        out.append({"case": f"attention_rope CSA fp8_split batch={batch} at a device position", "config": {},
                    "call": lambda a=(q, kv, sinks, selected, ring, entries): attention_rope(
                        *a[:3], torch.tensor([cap * 4 + 3]), inv_freq, a[3], state=a[4:], pos0=torch.tensor([cap * 4 + 3]),
                        window=window, rate=4, scale=d ** -0.5, kv_format="fp8_split", rope_dim=rope,
                        out_rope={"inverse": True})})
        # ... and norm_attention: the queries' and new keys' norms and RoPE in the launch too
        out.append({"case": f"norm_attention_rope CSA fp8_split batch={batch} at a device position", "config": {},
                    "call": lambda a=(q, kv, sinks, selected, ring, entries): norm_attention_rope(
                        *a[:2], torch.ones(d), a[2], torch.tensor([cap * 4 + 3]), inv_freq, a[3], state=a[4:],
                        pos0=torch.tensor([cap * 4 + 3]), window=window, rate=4, scale=d ** -0.5,
                        kv_format="fp8_split", rope_dim=rope, out_rope={"inverse": True}, q_norm={"eps": 1e-6},
                        kv_norm={"eps": 1e-6})})
    return out


def indexer_cases(extra: list[dict], batches: list[int]) -> list[dict]:
    """The Lightning Indexer's scoring and top-k at V4-Flash's sizes: 64 heads x 128, top-512 of 4096 FP8 keys."""
    from v4c.runtime.quant import encode_entries
    from v4c.targets.triton.kernels.indexer import index_topk, rope_index_topk
    heads, d, topk, cap, rate = 64, 128, 512, 4096, 4
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 64, 2) / 64)
    out = []
    for batch in batches:
        q, w = torch.randn(batch, 1, heads, d), torch.randn(batch, 1, heads)
        keys = encode_entries(torch.randn(batch, cap, d), "fp8_block", 0)
        for cfg, pos0 in [({}, cap * rate - 1)] + [(c, cap * rate - 1) for c in extra] + [
                ({}, torch.tensor([cap * rate - 1]))]:
            where = " at a device position" if isinstance(pos0, torch.Tensor) else ""
            out.append({"case": f"index_topk fp8_block batch={batch}{where}", "config": cfg,
                        "call": lambda cfg=cfg, pos0=pos0, q=q, w=w, keys=keys: index_topk(
                            q, w, state=(keys,), pos0=pos0, topk=topk, rate=rate, score_scale=d ** -0.5,
                            weight_scale=heads ** -0.5, key_format="fp8_block", config=cfg)})
        # the fuse pass's rope_index: the queries' RoPE (64 channels) in the score programs
        out.append({"case": f"rope_index_topk fp8_block batch={batch} at a device position", "config": {},
                    "call": lambda q=q, w=w, keys=keys: rope_index_topk(
                        q, w, torch.tensor([cap * rate - 1]), inv_freq, state=(keys,),
                        pos0=torch.tensor([cap * rate - 1]), topk=topk, rate=rate, score_scale=d ** -0.5,
                        weight_scale=heads ** -0.5, key_format="fp8_block", q_rope={})})
    return out


def compress_cases(batches: list[int]) -> list[dict]:
    """The compressors of a V4-Flash decode step, a token that closes its window: CSA (d 512, 64 RoPE channels,
    rate 4 with overlap, fp8_split entries), HCA (rate 128, no overlap) and the indexer's keys (d 128, rate 4 with
    overlap, fp8_block), at an int position and at a device position (the push / pool / carry kernels), and the CSA
    layer's two as one compress_pair launch at a device position."""
    from v4c.runtime.quant import entry_layout
    from v4c.targets.triton.kernels.compressor import compress
    from v4c.targets.triton.kernels.compressor_pair import compress_pair
    out = []
    for batch in batches:
        made = {}
        for name, d, rope, rate, overlap, fmt in (("CSA", 512, 64, 4, True, "fp8_split"),
                                                  ("HCA", 512, 64, 128, False, "fp8_split"),
                                                  ("indexer keys", 128, 64, 4, True, "fp8_block")):
            c = 2 * d if overlap else d
            dtype, width = entry_layout(fmt, d, rope)
            state = tuple(torch.zeros(batch, rate, w) for w in ([c, c, d, d] if overlap else [c, c])) + (
                torch.zeros(batch, 64, width, dtype=getattr(torch, {"u8": "uint8"}.get(dtype, dtype))),)
            args = (torch.randn(batch, 1, c), torch.randn(batch, 1, c), torch.randn(rate, c), torch.ones(d),
                    torch.rand(rope // 2))
            made[name] = (args, state, {"rate": rate, "overlap": overlap, "eps": 1e-6, "kv_format": fmt})
            for pos0 in (8 * rate - 1, torch.tensor([8 * rate - 1])):
                where = " at a device position" if isinstance(pos0, torch.Tensor) else ""
                out.append({"case": f"compress {name} {fmt} batch={batch}{where}", "config": {},
                            "call": lambda a=args, st=state, p=pos0, r=rate, o=overlap, f=fmt: compress(
                                *a, state=st, pos0=p, rate=r, overlap=o, eps=1e-6, kv_format=f)})
        (a, sa, fa), (b, sb, fb) = made["CSA"], made["indexer keys"]  # a CSA layer's pair (compressor_pair.py)
        out.append({"case": f"compress_pair CSA + indexer keys batch={batch} at a device position", "config": {},
                    "call": lambda a=a, b=b, st=sa + sb, fa=fa, fb=fb, p=torch.tensor([31]): compress_pair(
                        *a, *b, state=st, pos0=p, first=fa, second=fb)})
    return out


def hyper_cases() -> list[dict]:
    """mHC's hc_pre, hc_post_pre (the fuse pass's: the previous block's hc_post computed in hc_pre's K loop),
    hc_post_pre_quant (the fuse pass's: with the next input norm's rms_norm_quant), hc_head and hc_post_head(_norm)
    (the triton lowering's: the last hc_post in hc_head's K loop, and the final norm) at V4-Flash sizes (hc 4,
    D 4096: fn [24, 16384] fp32) for 1 and 16 decode tokens (their projection split over the SMs) and a 4096-token
    prefill (one program a token)."""
    from triton_gpu import ACT

    from v4c.targets.triton.kernels.hyper import hc_head, hc_post_pre, hc_pre
    from v4c.targets.triton.kernels.hyper_head import hc_post_head, hc_post_head_norm
    from v4c.targets.triton.kernels.hyper_quant import hc_post_pre_quant
    hc, d = 4, 4096
    n = (2 + hc) * hc
    fn, base, scale = torch.randn(n, hc * d) * 0.01, torch.randn(n), torch.ones(3)
    out = []
    for tokens in (1, 16, 4096):
        streams = torch.randn(1, tokens, hc, d)
        out.append({"case": f"hc_pre hc={hc} d={d} tokens={tokens}", "config": {},
                    "call": lambda x=streams: hc_pre(x, fn, base, scale, iters=20, eps=1e-6, norm_eps=1e-6)})
        prev = torch.randn(1, tokens, d), torch.rand(1, tokens, hc), torch.rand(1, tokens, hc, hc)
        out.append({"case": f"hc_post_pre hc={hc} d={d} tokens={tokens}", "config": {},
                    "call": lambda x=streams, p=prev: hc_post_pre(p[0], x, p[1], p[2], fn, base, scale, p[0], iters=20,
                                                                  eps=1e-6, norm_eps=1e-6)})
        quant = {"eps": 1e-6, "group": ACT["group"], "scale_format": ACT["scale_format"], "keep": True}
        out.append({"case": f"hc_post_pre_quant hc={hc} d={d} tokens={tokens}", "config": {},
                    "call": lambda x=streams, p=prev: hc_post_pre_quant(p[0], x, p[1], p[2], fn, base, scale,
                                                                        torch.ones(d), p[0], iters=20, eps=1e-6,
                                                                        norm_eps=1e-6, quant=quant)})
        out.append({"case": f"hc_head hc={hc} d={d} tokens={tokens}", "config": {},
                    "call": lambda x=streams: hc_head(x, fn[:hc], base[:hc], scale[:1], eps=1e-6, norm_eps=1e-6)})
        out.append({"case": f"hc_post_head hc={hc} d={d} tokens={tokens}", "config": {},
                    "call": lambda x=streams, p=prev: hc_post_head(p[0], x, p[1], p[2], fn[:hc], base[:hc], scale[:1],
                                                                   eps=1e-6, norm_eps=1e-6)})
        out.append({"case": f"hc_post_head_norm hc={hc} d={d} tokens={tokens}", "config": {},
                    "call": lambda x=streams, p=prev: hc_post_head_norm(p[0], x, p[1], p[2], fn[:hc], base[:hc],
                                                                        scale[:1], torch.ones(d), eps=1e-6,
                                                                        norm_eps=1e-6, norm={"eps": 1e-6})})
    return out


def artifact_cases(name: str) -> list[dict]:
    """Every kernel of a prefill (64 tokens) and a decode step of issue 7's `small` / `medium` triton artifact (the
    FP8 recipe of bench/triton_gpu.py). No kernel runs, so every buffer is zeros: the host code that reads ids
    (routing, selections) then sees valid ones."""
    from triton_gpu import MEDIUM, SMALL, _build, scratch_dir

    import v4c.runtime.kernelset as kernelset
    from v4c.runtime.artifact import open_artifact
    from v4c.runtime.executor import Session
    path, _ = _build(scratch_dir("v4c-sm90-"), name, {"small": SMALL, "medium": MEDIUM}[name], 64, 4)
    art = open_artifact(path)
    kernelset.check_triton_device = lambda device: None  # compiled for the GPU, never run: the CPU is fine
    session = Session(art.program, art.weights(), kernels=kernelset.triton_kernels(art.store, art.manifest))
    as_h100()  # the artifact's kernel package is loaded now
    session.arena.zero_()

    def step(tokens):
        empty, torch.empty = torch.empty, torch.zeros
        try:
            session.forward(torch.zeros(1, tokens, dtype=torch.long))
        finally:
            torch.empty = empty
    return [{"case": f"{name} prefill 64 tokens", "config": {}, "call": lambda: step(64)},
            {"case": f"{name} decode step", "config": {}, "call": lambda: step(1)}]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated families of attention, indexer, compress, hyper, gemm, moe "
                    "(default: all); none: only --artifacts")
    ap.add_argument("--artifacts", default="", help="also every kernel of these triton artifacts' prefill and decode "
                    "steps (comma-separated: small, medium; builds them, needs transformers)")
    ap.add_argument("--attention-configs", default="[]", help="JSON list of extra attention launch configs")
    ap.add_argument("--batches", default="1,64", help="attention batch sizes (comma-separated; 1 splits the keys)")
    ap.add_argument("--indexer-configs", default="[]", help="JSON list of extra index_topk launch configs")
    ap.add_argument("--gemm-configs", default="[]", help="JSON list of extra FP8 GEMM launch configs")
    ap.add_argument("--moe-configs", default="[]", help="JSON list of extra moe_experts_q launch configs")
    ap.add_argument("--gemm-candidates", action="store_true", help="also every config of the FP8 GEMM candidate grid")
    ap.add_argument("--ws-candidates", action="store_true", help="also every warp-specialized FP8 GEMM config the "
                    "tuner times (configs.CANDIDATES_WS) in each form of the GEMM, at prefill")
    ap.add_argument("--moe-candidates", default="", help="also every config of the expert candidate grid for these "
                    "expert formats (comma-separated: fp8, fp4); rows say whether the tuner times it ('tuned')")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sm90_static.json")
    args = ap.parse_args()
    families = set((args.only or "attention,indexer,compress,hyper,gemm,moe").split(","))
    if not families <= {"attention", "indexer", "compress", "hyper", "gemm", "moe", "none"}:
        ap.error(f"--only {args.only}: expected attention, indexer, compress, hyper, gemm, moe or none")
    as_h100()
    cases = []
    if "attention" in families:
        cases += attention_cases(json.loads(args.attention_configs), [int(b) for b in args.batches.split(",")])
    if "indexer" in families:
        cases += indexer_cases(json.loads(args.indexer_configs), [int(b) for b in args.batches.split(",")])
    if "compress" in families:
        cases += compress_cases([int(b) for b in args.batches.split(",")])
    if "hyper" in families:
        cases += hyper_cases()
    if "gemm" in families:
        cases += gemm_cases(json.loads(args.gemm_configs))
    if "moe" in families:
        cases += moe_cases(json.loads(args.moe_configs))
    if args.gemm_candidates:
        cases += gemm_candidate_cases()
    if args.ws_candidates:
        cases += ws_candidate_cases()
    for fmt in filter(None, args.moe_candidates.split(",")):
        if fmt not in ("fp8", "fp4"):
            ap.error(f"--moe-candidates {args.moe_candidates}: expected fp8 and / or fp4")
        cases += moe_candidate_cases(fmt)
    for name in filter(None, args.artifacts.split(",")):
        cases += artifact_cases(name)
    rows = []
    for case in cases:
        t0 = time.perf_counter()
        with Catch() as catch:
            case["call"]()
        seen = set()
        for k in catch.compiled:
            key = json.dumps({x: k[x] for x in ("kernel", "constexprs", "num_warps", "num_stages")}, sort_keys=True)
            if key in seen:  # an artifact launches the same specialization once per layer
                continue
            seen.add(key)
            rows.append({"case": case["case"], "config": case["config"],
                         **({"tuned": case["tuned"]} if "tuned" in case else {}), **k})
            sass = k["sass"]
            print(f"{case['case']:45} {json.dumps(case['config']):40} {k['kernel']:22} warps {k['num_warps']} "
                  f"regs {k['registers']:3} spill {k['spill_store_bytes']:5}/{k['spill_load_bytes']:<5} "
                  f"smem {k['shared_bytes'] // 1024:3} KiB ctas/SM {k['ctas_per_sm']} "
                  f"sass {sass.get('total', 0):6} ({time.perf_counter() - t0:.0f} s)", flush=True)
    result = {"benchmark": "sm90_static", "date": time.strftime("%Y-%m-%d"),
              "what": "the triton target's kernels compiled for sm_90a without a GPU (no timing): ptxas -v and SASS",
              "command": "python bench/sm90_static.py " + " ".join(sys.argv[1:]), "commit": _commit(),
              "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                          "triton": triton.__version__, "torch": torch.__version__, "ptxas": _ptxas()},
              "target": {"arch": "sm_90a", "assumed_sms": H100["sms"]}, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The triton target on a GPU: FP8 GEMM against cuBLAS, sparse decode attention against a copy, and
end-to-end decode against transformers eager bf16, all in one run on one GPU.

    .venv/bin/python bench/triton_gpu.py              # on a CUDA GPU -> bench/results/triton_gpu.json
    .venv/bin/python bench/triton_gpu.py --dry-run    # no GPU: tiny shapes under TRITON_INTERPRET=1

1. FP8 GEMM (`linear_fp8`: e4m3 weights, 128x128 fp32 block scales, activations quantized per
   token group of 128 inside the kernel) at V4-Flash layer shapes, decode (16, 64, 128 tokens) and
   prefill (4096 tokens), each in the bucket an artifact gives it (16 and 64 tokens: decode's, up to
   configs.FP8_GEMM_DECODE_TOKENS; 128: prefill's, with the decode bucket's config timed beside it; `tried` has
   each config's time), against `torch._scaled_mm`
   (cuBLAS) on the same shapes with per-tensor scales and pre-quantized activations (cuBLAS's best
   case: no block scales, no quantization).
   Each v4c row is the fastest of the compile-time tuning candidates (what `tune: auto` records).
2. Sparse decode attention (`attention`, CSA, DeepSeek's split FP8 entries: 448 e4m3 + 64 bf16
   channels + 7 UE8M0 scales = 584 bytes): batch 1..128, 64 heads, head_dim 512, top-k 512 of 4096
   entries, window 128. Achieved bandwidth = bytes the kernel must read (selected entries, ring,
   queries) and write, over its time, against a device-to-device copy measured in the same run.
3. End to end: the `small` and `medium` configurations of issues 6 and 7 (random weights, tid2eid
   random distinct experts), FP8 (128x128 weights, dynamic activations, FP8 KV), `target: triton`,
   batch 1, prompt 512, 64 new greedy tokens; decode tokens/s against transformers eager bf16, for the
   artifact run eagerly and with CUDA graphs (`Session(graphs=True)`: the position-independent runs of
   steps replayed as graphs; its greedy tokens are checked against the eager run's).

Kernel times are device times per call: the calls, one per copy of the inputs (rotated so that one
replay reads >= 256 MB and the weights do not stay in the 50 MB L2), are captured in a CUDA graph and
its replays timed; medians of `--repeats` replays (CUDA events, after warm-up), with min and max. The
eager time of one call (host launch overhead included) is recorded beside it. Without a GPU and
without --dry-run, every row is recorded as "not measured" (never estimated).
"""

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "triton_gpu.json"
if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

# v4c itself comes from the installed package (the source folders map onto v4c.* only when installed)
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from cpu_small import SMALL  # noqa: E402  (issue 6's `small` configuration, shared with the CPU benchmark)

# V4-Flash projection shapes (N, K): hidden 4096, q_lora 1024, 64 heads x 512, o_groups 8 x o_lora 1024,
# routed experts 256 x moe_intermediate 2048 (gate and up fused).
FLASH_GEMMS = {"q_a": (1024, 4096), "q_b": (64 * 512, 1024), "kv": (512, 4096), "o_b": (4096, 8 * 1024),
               "expert_gate_up": (2 * 2048, 4096), "expert_down": (4096, 2048)}
DECODE_TOKENS, PREFILL_TOKENS = (16, 64, 128), 4096
ATTN = {"heads": 64, "dim": 512, "rope": 64, "topk": 512, "entries": 4096, "window": 128,
        "batches": (1, 2, 4, 8, 16, 32, 64, 128)}
MEDIUM = dict(vocab_size=16384, hidden_size=2048, num_hidden_layers=12, num_attention_heads=16, head_dim=256,
              q_lora_rank=768, n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=256,
              o_groups=4, o_lora_rank=512, index_n_heads=16, index_head_dim=128, index_topk=128, sliding_window=128,
              compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 64},
              layer_types=["sliding_attention"] + ["compressed_sparse_attention", "heavily_compressed_attention"] * 5
              + ["compressed_sparse_attention"])
E2E = {"prompt": 512, "new_tokens": 64, "batch": 1}
# --dry-run: the same code paths at shapes the interpreter runs in seconds.
DRY = {"gemms": {"q_a": (80, 256)}, "decode_tokens": (3, 20, 65), "prefill_tokens": 72,
       "attn": {"heads": 4, "dim": 128, "rope": 64, "topk": 8, "entries": 32, "window": 8, "batches": (1, 2)},
       "e2e": {"prompt": 20, "new_tokens": 3, "batch": 1}}
# the GPU recipe: FP8 (the default skip list) and `fuse` (norms quantize once for their FP8 readers)
FP8_RECIPE = ("  - fp8:\n      weights: {block: [128, 128], scale_format: fp32}\n"
              "      activations: {mode: dynamic, group: 128}\n      kv: fp8\n  - fuse\n")
ACT = {"mode": "dynamic", "group": 128, "scale_format": "fp32"}
PROFILE = "--profile" in sys.argv  # e2e: cProfile one v4c decode run (the host side of the decode loop)
TUNE = "--heuristic-only" not in sys.argv  # time every tuning candidate (slow: each one compiles) or only the heuristic


from gpu_measure import (Timer, copies_for, copy_bandwidth, fastest, logits_agreement, machine,  # noqa: E402,F401
                         rel_err)


DETERMINISM_RUNS = 50
# a GEMM config whose result is further than this from the reference (max error over max magnitude) is not timed;
# a correct one is within 3e-4 (e4m3 codes that round the other way; bench/results/triton_gpu.json)
GEMM_WRONG = 1e-2


def _fp8_gemm(x, q, s, config):
    from v4c.targets.triton.kernels.gemm import linear_fp8
    return linear_fp8(x, q, s, block=(128, 128), act=ACT, config=config)


def bench_gemm(device: str, timer: Timer, dry: bool, extra: list[dict]) -> list[dict]:
    from v4c.runtime.quant import dequant_fp8, fake_quant_act, quant_fp8
    from v4c.targets.triton.configs import BUCKETS, candidates, heuristic
    shapes = DRY["gemms"] if dry else FLASH_GEMMS
    prefill_m = DRY["prefill_tokens"] if dry else PREFILL_TOKENS
    # each call in the bucket an artifact gives it: the first whose token limit covers it (launch.json's rule)
    limits = [(name, b["max_tokens"]) for (name, _), b in zip(BUCKETS, heuristic("linear_fp8"))]
    calls = [(next(name for name, limit in limits if limit is None or m <= limit), m)
             for m in (DRY["decode_tokens"] if dry else DECODE_TOKENS)]
    calls.append(("prefill", prefill_m))
    rows, g = [], torch.Generator().manual_seed(0)
    for name, (n, k) in shapes.items():
        q, s = quant_fp8(torch.randn(n, k, generator=g) * 0.02, (128, 128))
        q, s = q.to(device), s.to(device)
        weights = [(q, s)] + [(q.clone(), s.clone()) for _ in range(copies_for(q.numel(), device) - 1)]
        for bucket, m in calls:
            x = torch.randn(m, k, generator=g).to(device)
            configs = [heuristic("linear_fp8")[0 if bucket == "decode" else 1]["config"]]
            configs += [c for c in extra if bucket == "prefill" or not c.get("WARP_SPEC")]  # (prefill's K loop)
            if bucket == "prefill" and m < prefill_m:  # a batch of 17+ tokens: the decode tiles beside the artifact's
                configs.append(heuristic("linear_fp8")[0]["config"])
            tried = []
            if not dry and TUNE:
                configs += candidates("linear_fp8", bucket)
            ref = torch.nn.functional.linear(fake_quant_act(x.cpu(), ACT), dequant_fp8(q.cpu(), s.cpu(), (128, 128)))

            def graph_time(cfg, x=x, weights=weights, ref=ref):  # each config's result is checked before it is timed
                err = rel_err(_fp8_gemm(x, q, s, cfg), ref)
                if not err <= GEMM_WRONG:
                    raise ValueError(f"wrong result: error {err:.1e} against the reference")
                return timer.graph([functools.partial(_fp8_gemm, x, wq, ws, cfg) for wq, ws in weights])
            best = fastest(graph_time, configs, f"gemm {name} m={m}", tried)
            eager = timer(functools.partial(_fp8_gemm, x, q, s, best[1]))
            ours = _fp8_gemm(x, q, s, best[1])
            err = rel_err(ours, ref)  # the reference runs on the CPU
            # the split-K sums added by each tile's last program (SUM_IN_KERNEL): a race would show as results that
            # vary from run to run; and the same config with a torch.sum instead, side by side
            runs = 2 if dry else DETERMINISM_RUNS
            same = all(torch.equal(_fp8_gemm(x, q, s, best[1]), ours) for _ in range(runs))
            row = {"gemm": name, "n": n, "k": k, "tokens": m, "bucket": bucket, "rel_err_vs_reference": err,
                   "same_bits_run_to_run": {"runs": runs, "same": same},
                   "v4c_sum_by_torch": graph_time({**best[1], "SUM_IN_KERNEL": False}) if m < prefill_m else None,
                   "artifact_config": configs[0], "tried": tried,
                   "weight_copies": len(weights), "v4c": best[0], "v4c_config": best[1], "v4c_eager_call": eager,
                   "v4c_tflops": round(2 * m * n * k / best[0]["median_s"] / 1e12, 3),
                   "v4c_weight_gb_per_s": round(n * k / best[0]["median_s"] / 1e9, 1)}
            if device == "cuda" and hasattr(torch, "_scaled_mm"):
                mp = -(-m // 16) * 16  # cuBLAS FP8 needs multiples of 16
                xq = torch.randn(mp, k, device=device).to(torch.float8_e4m3fn)
                one = torch.ones((), device=device)
                t = timer.graph([functools.partial(torch._scaled_mm, xq, wq.t(), scale_a=one, scale_b=one,
                                                   out_dtype=torch.bfloat16) for wq, _ in weights])
                row.update(cublas=t, cublas_tokens=mp, cublas_recipe="per-tensor scales, pre-quantized activations",
                           v4c_over_cublas_throughput=round(t["median_s"] / best[0]["median_s"], 3))
            else:
                row["cublas"] = "not measured (needs a CUDA GPU)"
            rows.append(row)
            print(f"gemm {name:15} n={n:6} k={k:5} m={m:5}: err {err:.1e}{'' if same else ' RESULTS VARY'} "
                  f"v4c {best[0]['median_s'] * 1e6:8.1f} us "
                  f"(eager call {eager['median_s'] * 1e6:6.1f} us)"
                  + (f", cuBLAS {row['cublas']['median_s'] * 1e6:8.1f} us ({row['v4c_over_cublas_throughput']:.2f}x)"
                     if isinstance(row["cublas"], dict) else "") + f"  {best[1]}")
    return rows


def bench_attention(device: str, timer: Timer, dry: bool, copy: dict, extra: list[dict]) -> list[dict]:
    from v4c.runtime.kernels.attention import attention as ref_attention
    from v4c.runtime.quant import encode_entries, entry_layout
    from v4c.targets.triton.configs import candidates

    from v4c.targets.triton.kernels.attention import attention
    a = DRY["attn"] if dry else ATTN
    h, d, rope, topk, cap, window = a["heads"], a["dim"], a["rope"], a["topk"], a["entries"], a["window"]
    width = entry_layout("fp8_split", d, rope)[1]
    rows, g = [], torch.Generator().manual_seed(1)
    for batch in a["batches"]:
        q = torch.randn(batch, 1, h, d, generator=g).to(device)
        kv = torch.randn(batch, 1, d, generator=g).to(device)
        sinks = torch.randn(h, generator=g).to(device)
        ring = encode_entries(torch.randn(batch, window - 1, d, generator=g), "fp8_split", rope).to(device)
        entries = encode_entries(torch.randn(batch, cap, d, generator=g), "fp8_split", rope).to(device)
        selected = torch.stack([torch.randperm(cap, generator=g)[:topk] for _ in range(batch)])[:, None].to(device)
        pos0 = cap * 4 + 3  # every entry closed at rate 4; the ring full
        kwargs = {"pos0": pos0, "window": window, "rate": 4, "scale": d ** -0.5, "kv_format": "fp8_split",
                  "rope_dim": rope}
        moved = batch * (topk * width + (window - 1) * width + h * d * 4 + d * 4 + topk * 8 + h * d * 4 + width)
        inputs = [(q, kv, sinks, selected, ring, entries)] + [
            (q.clone(), kv.clone(), sinks, selected.clone(), ring.clone(), entries.clone())
            for _ in range(copies_for(moved, device) - 1)]

        def calls(cfg, kwargs=kwargs, inputs=inputs):
            return [functools.partial(attention, *i[:4], state=i[4:], **kwargs, config=cfg) for i in inputs]
        configs = [{}] + extra + ([] if dry or not TUNE else candidates("attention", "decode"))
        tried: list[dict] = []
        best = fastest(lambda cfg: timer.graph(calls(cfg)), configs, f"attention batch={batch}", tried)
        eager = timer(calls(best[1])[0])
        ref = ref_attention(q.cpu(), kv.cpu(), sinks.cpu(), selected.cpu(), state=(ring.cpu(), entries.cpu()), **kwargs)
        for t in tried:  # the error of each config that ran: DOT (bf16 / tf32 / ieee) trades precision for speed
            if "median_s" in t:
                ours = attention(q, kv, sinks, selected, state=(ring.clone(), entries), **kwargs, config=t["config"])
                t["rel_err_vs_reference"] = rel_err(ours, ref)  # the reference runs on the CPU
        err = next(t["rel_err_vs_reference"] for t in tried if t["config"] == best[1])
        # moved (above): read the top-k entries, the ring, queries, the new KV, selections; written: outputs,
        # the ring row
        gbs = moved / best[0]["median_s"] / 1e9
        rows.append({"batch": batch, "rel_err_vs_reference": err, "bytes": moved, "input_copies": len(inputs),
                     "v4c": best[0], "v4c_config": best[1], "v4c_eager_call": eager, "gb_per_s": float(f"{gbs:.4g}"),
                     "fraction_of_copy": float(f"{gbs / copy['gb_per_s']:.3g}"), "configs_tried": tried})
        print(f"attention batch={batch:4}: err {err:.1e} {best[0]['median_s'] * 1e6:9.1f} us (eager call "
              f"{eager['median_s'] * 1e6:7.1f} us), {gbs:8.1f} GB/s ({gbs / copy['gb_per_s']:.1%} of copy)")
    return rows


_SCRATCH: list = []  # build directories kept until the interpreter exits, then removed


def scratch_dir(prefix: str) -> Path:
    """A temporary directory that lives until this process exits (removed then, also on an error): for artifacts a
    caller keeps open past the function that built them. A bare mkdtemp would leave gigabytes in /tmp per run."""
    _SCRATCH.append(tempfile.TemporaryDirectory(prefix=prefix))
    return Path(_SCRATCH[-1].name)


def _build(tmp: Path, name: str, kwargs: dict, prompt: int, new: int, recipe: str = FP8_RECIPE,
           tune: bool | None = None) -> tuple[Path, object]:
    """Compile `kwargs`' model for the triton target; tune (default: TUNE) times every launch candidate on the
    GPU at compile time, minutes per shape."""
    from oracle import make_model, save_hf

    from v4c.compile import compile_model
    model = make_model(kwargs, seed=0)
    ckpt = save_hf(model, tmp / f"{name}-ckpt")
    tune = "auto" if (TUNE if tune is None else tune) else "off"
    (tmp / f"{name}.yaml").write_text(f"model:\n  checkpoint: {ckpt}\ntarget: triton\ntune: {tune}\n"
                                      f"passes:\n{recipe}"
                                      f"kv:\n  max_context: {prompt + new + 16}\n  prefill_chunk: {prompt}\n")
    compile_model(tmp / f"{name}.yaml", tmp / name)
    return tmp / name, model


def _decode_rate(step, prompt_ids, new: int, device: str) -> tuple[float, list[int]]:
    """Tokens/s of `new` greedy steps after a prefill (not timed): step(ids) -> logits [B, S, V]."""
    logits = step(prompt_ids)[:, -1]
    out = []
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(new):
        token = logits.argmax(-1, keepdim=True)
        out.append(int(token[0, 0]))
        logits = step(token)[:, -1]
    if device == "cuda":
        torch.cuda.synchronize()
    return new * prompt_ids.shape[0] / (time.perf_counter() - t0), out


def bench_e2e(device: str, repeats: int, dry: bool, names=("small", "medium")) -> list[dict]:
    from v4c.runtime.artifact import open_artifact
    rows, e = [], DRY["e2e"] if dry else E2E
    configs = {"hc4_mixed (dry run)": "hc4_mixed"} if dry else {n: {"small": SMALL, "medium": MEDIUM}[n] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in configs.items():
            path, model = _build(Path(tmp), name.split()[0], kwargs, e["prompt"], e["new_tokens"])
            rows.append(_e2e_rows(name, open_artifact(path), model, e, device, repeats))
    return rows


def _e2e_rows(name: str, art, model, e: dict, device: str, repeats: int) -> dict:
    """Decode tokens/s of the artifact and of transformers eager bf16 (same weights), interleaved."""
    ids = torch.randint(0, model.config.vocab_size, (e["batch"], e["prompt"]),
                        generator=torch.Generator().manual_seed(2)).to(device)
    ref = model.to(torch.bfloat16).to(device).eval()

    graphs = device.startswith("cuda")  # CUDA graphs need a GPU: the dry run times the eager path only
    reports = {}

    def v4c_run(use_graphs=False):
        session = art.session(e["batch"], device=device, strict=True, graphs=use_graphs)
        result = _decode_rate(session.forward, ids, e["new_tokens"], device)
        if use_graphs:
            reports["graphs"] = session.graph_report()
        return result

    def hf_run():
        cache = {"past": None}

        @torch.no_grad()
        def step(x):
            out = ref(input_ids=x, past_key_values=cache["past"], use_cache=True)
            cache["past"] = out.past_key_values
            return out.logits.float()
        return _decode_rate(step, ids, e["new_tokens"], device)

    runs = {"v4c": v4c_run, "transformers_bf16": hf_run}
    if graphs:
        runs["v4c_cuda_graphs"] = functools.partial(v4c_run, True)
    rates = {k: [] for k in runs}
    tokens = {k: fn()[1] for k, fn in runs.items()}  # warm-up: Triton compiles every kernel on first use
    check = _e2e_check(art, ids, device)
    profile = _host_profile(runs["v4c_cuda_graphs" if graphs else "v4c"]) if PROFILE else None
    for _ in range(repeats):
        for key, fn in runs.items():
            rates[key].append(fn()[0])
    row = {"config": name, **e, "prefill_logits_vs_torch_kernels": check, "decode_tokens_per_s": {
        k: {"median": round(statistics.median(v), 2), "min": round(min(v), 2), "max": round(max(v), 2)}
        for k, v in rates.items()}}
    hf = row["decode_tokens_per_s"]["transformers_bf16"]["median"]
    row["speedup"] = round(row["decode_tokens_per_s"]["v4c"]["median"] / hf, 2)
    if graphs:
        row["speedup_cuda_graphs"] = round(row["decode_tokens_per_s"]["v4c_cuda_graphs"]["median"] / hf, 2)
        row["cuda_graphs"] = {**reports["graphs"], "same_greedy_tokens_as_eager": tokens["v4c_cuda_graphs"]
                              == tokens["v4c"]}
    if profile:
        row["host_profile"] = profile
    print(f"e2e {name}: prefill logits vs the artifact's torch kernels: {check}")
    print(f"e2e {name}: " + ", ".join(f"{k} {v['median']:.1f} tok/s" for k, v in row["decode_tokens_per_s"].items())
          + f" (v4c / transformers: {row['speedup']}x"
          + (f", with CUDA graphs {row['speedup_cuda_graphs']}x; {row['cuda_graphs']})" if graphs else ")"))
    return row


def _e2e_check(art, ids, device: str) -> dict:
    """The triton artifact's prefill logits against the same artifact run with the runtime's torch reference
    kernels, on the same device: max |diff| / max |ref| and argmax agreement over the prompt."""
    try:
        with torch.no_grad():
            ours = art.session(ids.shape[0], device=device, strict=True).forward(ids)
            ref = art.session(ids.shape[0], kernels="torch", device=device).forward(ids)
    except Exception as exc:  # recorded, so the timing rows of this run are not lost
        return {"error": f"{type(exc).__name__}: {exc}"}
    return logits_agreement(ours, ref)


def _host_profile(run, top: int = 25) -> list[dict]:
    """cProfile of one decode run: the functions with the most own time (the host side of a decode step)."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.runcall(run)
    stats = pstats.Stats(prof).sort_stats("tottime")
    rows = []
    for (file, line, fn), (_, calls, tottime, cumtime, _) in list(stats.stats.items()):
        rows.append({"function": f"{Path(file).name}:{line}:{fn}", "calls": calls, "tottime_s": round(tottime, 4),
                     "cumtime_s": round(cumtime, 4)})
    rows.sort(key=lambda r: -r["tottime_s"])
    for r in rows[:top]:
        print(f"  host: own {r['tottime_s']:8.4f} s, cumulative {r['cumtime_s']:8.4f} s, {r['calls']:7} calls  "
              f"{r['function']}")
    return rows[:top]


def not_measured(reason: str) -> dict:
    return {"status": "not measured", "reason": reason,
            "rows": {"fp8_gemm_vs_cublas": "not measured", "sparse_decode_attention_vs_copy": "not measured",
                     "e2e_small_vs_transformers_bf16": "not measured", "e2e_medium_vs_transformers_bf16": "not measured"}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1: checks "
                    "the script, measures nothing meaningful; prints, and writes only with --out")
    ap.add_argument("--sections", default="gemm,attention,e2e", help="comma-separated subset (default: all)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--heuristic-only", action="store_true", help="time only the heuristic launch configs, not every "
                    "tuning candidate (each candidate compiles: minutes per shape)")
    ap.add_argument("--profile", action="store_true", help="e2e: print and record the host functions that take "
                    "the most time in one v4c decode run (cProfile)")
    ap.add_argument("--e2e-configs", default="small,medium", help="e2e: which configurations (small, medium)")
    ap.add_argument("--gemm-configs", default="[]", help="JSON list of extra linear_fp8 launch configs to time "
                    'beside the heuristic one, e.g. \'[{"BLOCK_N": 256}]\'')
    ap.add_argument("--attention-configs", default="[]", help="JSON list of extra attention launch configs to "
                    "time beside the default one (each row records every config's time and error), e.g. "
                    '\'[{"DOT": "tf32"}]\'')
    ap.add_argument("--out", type=Path, default=None, help=f"results file (default {OUT.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    gpu = torch.cuda.is_available() and not args.dry_run
    result = {"benchmark": "triton_gpu", "date": time.strftime("%Y-%m-%d"), "machine": machine("cuda" if gpu else "cpu")}
    out = args.out or (None if args.dry_run else OUT)
    if not gpu and not args.dry_run:
        result.update(not_measured("no CUDA GPU on the machine that ran this script"))
        print("no CUDA GPU: every row recorded as 'not measured'")
    else:
        device = "cuda" if gpu else "cpu"
        timer = Timer(device, repeats=1 if args.dry_run else args.repeats, warmup=1 if args.dry_run else 3)
        result["status"] = "dry run (interpreter, tiny shapes: not a measurement)" if args.dry_run else "measured"
        result["copy"] = copy = copy_bandwidth(device, timer, 2**20 if args.dry_run else 2**30)
        print(f"device-to-device copy: {copy['gb_per_s']} GB/s")
        if "gemm" in sections:
            result["fp8_gemm"] = bench_gemm(device, timer, args.dry_run, json.loads(args.gemm_configs))
        if "attention" in sections:
            result["sparse_decode_attention"] = bench_attention(device, timer, args.dry_run, copy,
                                                                json.loads(args.attention_configs))
        if "e2e" in sections:
            result["e2e_decode"] = bench_e2e(device, 1 if args.dry_run else max(5, args.repeats // 2), args.dry_run,
                                             args.e2e_configs.split(","))
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()

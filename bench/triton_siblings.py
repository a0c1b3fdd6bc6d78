"""Sibling projections, separate launches against the triton lowering's one joined launch (targets/triton/siblings.py).

At V4-Flash decode sizes (K 4096; 1 and 16 tokens), three groups the lowering joins in every layer:
q_a_proj + kv_proj and the shared expert's gate + up (FP8 e4m3, 128x128 fp32 block scales, reading the input
norm's e4m3 codes as after the `fuse` pass), and a CSA layer's compressor and indexer projections (kv, gate,
indexer kv, indexer gate, scorer: fp32 weights, fp8's default skip list). Each is timed as CUDA graph replays
(device time, no host: `triton_gpu.Timer.graph`), the separate launches one after another in one replay, the
weights rotated over copies so that each replay reads them from memory, not L2. Every row also records how far
the joined results are from the separate ones (the split-K factor is chosen per grid, so the K sums may be grouped
differently: fp32 rounding, not bits).

    .venv/bin/python bench/triton_siblings.py [--dry-run] [--repeats 7] [--out bench/results/triton_siblings.json]

Without a CUDA GPU (and without --dry-run) every row is recorded as "not measured".
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from triton_gpu import ACT, Timer, copies_for, machine  # noqa: E402

OUT = ROOT / "bench" / "results" / "triton_siblings.json"
K = 4096
GROUPS = {  # name -> (fp8, sibling widths)
    "q_a+kv": (True, [1024, 512]),
    "shared_expert gate+up": (True, [2048, 2048]),
    "compressor+indexer (CSA)": (False, [1024, 1024, 256, 256, 64]),
}
TOKENS = (1, 16)
DRY = {"k": 256, "groups": {"q_a+kv": (True, [128, 48]), "compressor+indexer (CSA)": (False, [40, 40, 17])},
       "tokens": (1,)}


def _group_calls(fp8: bool, sizes: list[int], k: int, m: int, device: str, g) -> tuple[list, list, tuple]:
    """-> (one (separate, joined) pair of calls per weight copy, the separate calls' results, the joined call's)."""
    from v4c.runtime.quant import quant_fp8
    from v4c.targets.triton.kernels.gemm import linear, linear_cat, linear_fp8, linear_fp8_cat
    ends = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    if fp8:  # the input norm's e4m3 codes and group scales, as after the fuse pass
        x = torch.randn(m, k, generator=g).to(torch.float8_e4m3fn).to(device)
        xs = (torch.rand(m, k // ACT["group"], generator=g) + 0.5).to(device)
        w, s = (t.to(device) for t in quant_fp8(torch.randn(ends[-1], k, generator=g) * 0.02, (128, 128)))

        def calls(w, s):
            parts = [(w[a:b], s[a // 128:-(-b // 128)]) for a, b in zip(ends, ends[1:])]
            return (lambda: [linear_fp8(x, pw, ps, xs, block=(128, 128), act=ACT) for pw, ps in parts],
                    lambda: linear_fp8_cat(x, w, s, xs, sizes=sizes, block=(128, 128), act=ACT))
        weights, nbytes = (w, s), w.numel()
    else:
        x = torch.randn(m, k, generator=g).to(device)
        w = (torch.randn(ends[-1], k, generator=g) * 0.02).to(device)

        def calls(w):
            return (lambda: [linear(x, p) for p in w.split(sizes)], lambda: linear_cat(x, w, sizes=sizes))
        weights, nbytes = (w,), w.numel() * 4
    # more weight copies (the same x), rotated: each replay reads the weights from memory, not from L2
    copies = [calls(*weights)] + [calls(*(t.clone() for t in weights)) for _ in range(copies_for(nbytes, device) - 1)]
    return copies, copies[0][0](), copies[0][1]()


def bench(device: str, timer: Timer, dry: bool) -> list[dict]:
    groups, k, tokens = (DRY["groups"], DRY["k"], DRY["tokens"]) if dry else (GROUPS, K, TOKENS)
    rows, g = [], torch.Generator().manual_seed(0)
    for name, (fp8, sizes) in groups.items():
        for m in tokens:
            copies, sep, joined = _group_calls(fp8, sizes, k, m, device, g)
            t_sep = timer.graph([c[0] for c in copies])
            t_joined = timer.graph([c[1] for c in copies])
            diff = max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
                       for a, b in zip(joined, sep))
            rows.append({"group": name, "fp8": fp8, "sizes": sizes, "k": k, "tokens": m,
                         "launches_separate": len(sizes), "separate": t_sep, "joined": t_joined, "joined_over_separate_time":
                         round(t_joined["median_s"] / t_sep["median_s"], 3), "rel_diff_joined_vs_separate": diff,
                         "weight_copies": len(copies)})
            print(f"{name:26} m={m:3}: separate ({len(sizes)} launches) {t_sep['median_s'] * 1e6:8.1f} us, "
                  f"joined {t_joined['median_s'] * 1e6:8.1f} us, rel diff {diff:.1e}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1 (checks "
                    "the script, measures nothing); writes only with --out")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None, help=f"results file (default {OUT.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.dry_run
    result = {"benchmark": "triton_siblings", "date": time.strftime("%Y-%m-%d"),
              "command": "python bench/triton_siblings.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine("cuda" if gpu else "cpu")}
    if not gpu and not args.dry_run:
        result.update(status="not measured", reason="no CUDA GPU on the machine that ran this script")
        print("no CUDA GPU: not measured")
    else:
        device = "cuda" if gpu else "cpu"
        timer = Timer(device, repeats=1 if args.dry_run else args.repeats, warmup=1 if args.dry_run else 3)
        result["status"] = "dry run (interpreter, tiny shapes: not a measurement)" if args.dry_run else "measured"
        result["rows"] = bench(device, timer, args.dry_run)
    out = args.out or (None if args.dry_run else OUT)
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()

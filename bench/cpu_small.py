"""Issue 6's CPU benchmark: the `small` configuration against transformers eager, side by side.

Builds the `small` DeepseekV4 configuration with random weights (every parameter randomised,
tid2eid random distinct experts; cached under build/bench/small-ckpt), compiles it with FP8
weights (block 128x128, dynamic activations, FP8 KV; the matrices DeepSeek keeps in higher precision
stored bf16, as its release does) for the chosen target, and runs `v4c bench`
with the transformers baseline (fp32 and bf16): prompt 2048, 64 new tokens, batch 1 and 4, 5 runs.

    .venv/bin/python bench/cpu_small.py [--target torch|tvm] [--batches 1,4] [--runs 5]
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# v4c comes from the installed package (the source folders map onto v4c.* only when installed)
sys.path.insert(0, str(ROOT / "tests"))

SMALL = dict(vocab_size=8192, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, head_dim=128,
             q_lora_rank=384, n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
             o_groups=4, o_lora_rank=256, index_n_heads=8, index_head_dim=64, index_topk=64, sliding_window=128,
             compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 32},
             layer_types=["sliding_attention"] + ["compressed_sparse_attention", "heavily_compressed_attention"] * 3
             + ["compressed_sparse_attention"])
FP8 = ("  - fp8:\n      weights: {block: [128, 128], scale_format: fp32}\n"
       "      activations: {mode: dynamic, group: 128}\n      kv: fp8\n      skipped_dtype: bf16\n")
WORK = ROOT / "build" / "bench"


def checkpoint() -> Path:
    path = WORK / "small-ckpt"
    if not (path / "config.json").exists():
        from oracle import make_model, save_hf
        save_hf(make_model(SMALL, seed=0), path)
    return path


def compile_small(target: str, context: int) -> Path:
    from v4c.compile import compile_model
    yaml = WORK / f"small-{target}.yaml"
    yaml.write_text(f"model:\n  checkpoint: {checkpoint()}\ntarget: {target}\npasses:\n{FP8}"
                    f"kv:\n  max_context: {context}\n  prefill_chunk: 512\n")
    out = WORK / f"small-{target}"
    compile_model(yaml, out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="torch", choices=["torch", "tvm"])
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--suffix", default="", help="appended to the result file's name (e.g. _b1)")
    args = ap.parse_args(argv)
    from v4c.bench import bench
    from v4c.views import print_bench
    WORK.mkdir(parents=True, exist_ok=True)
    art = compile_small(args.target, args.context + args.new_tokens)
    results = []
    for batch in map(int, args.batches.split(",")):
        r = bench(str(art), baseline="transformers", checkpoint=str(checkpoint()), context=args.context,
                  new_tokens=args.new_tokens, batch=batch, runs=args.runs,
                  progress=lambda m: print(m, file=sys.stderr))
        print_bench(r)
        results.append(r)
    out = ROOT / "bench" / "results" / f"cpu_small_{args.target}{args.suffix}.json"
    out.write_text(json.dumps({"benchmark": "cpu_small", "config": SMALL, "recipe": "fp8 128x128, dynamic act, fp8 KV, skipped matrices bf16",
                               "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

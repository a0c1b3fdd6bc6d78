"""FP8 recipes on examples/tiny-v4, side by side, against the bf16 artifact on held-out text.

Compiles the example unquantized (bf16 weights, as committed) and with each FP8 recipe, reads the
report of each (KL, top-1 agreement, top-5 containment, perplexity), the artifact's weight bytes,
and the KV bytes per token of each cache family from the runtime's allocator (the session's state
tensors), then prints a table and writes bench/results/fp8_tiny_v4.json.

    .venv/bin/python bench/fp8_tiny_v4.py
"""

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-v4"
sys.path.insert(0, str(ROOT))

from v4c import __version__  # noqa: E402
from v4c.compile import compile_model  # noqa: E402
from v4c.runtime.artifact import open_artifact  # noqa: E402
from v4c.runtime.kv import family_of  # noqa: E402

RECIPES = {
    "fp8 128x128, dynamic activations, fp8 KV (model-fp8.yaml)": {},
    "... with FP4 e2m1 experts": {"experts": "fp4"},
    "... with static activations (MSE-calibrated scales)": {"activations": {"mode": "static"}},
    "... weights only (fp32 activations and KV)": {"activations": {"mode": "none"}, "kv": "f32", "indexer": "f32"},
}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "v4c": __version__}


def kv_from_allocator(artifact: Path) -> dict:
    """Bytes per token of each cache family, from the state tensors a session allocates."""
    art = open_artifact(artifact)
    session = art.session()
    out = {}
    for name, t in session.state.items():
        fam = family_of(name, art.config)
        if fam in ("CSA entries", "HCA entries", "CSA indexer keys"):
            rate = art.config.compress_rates[int(name.split(".")[1])]
            row = out.setdefault(fam, {"bytes_per_entry": t[0, 0].numel() * t.element_size(), "dtype": str(t.dtype),
                                       "bytes_per_token": 0.0})
            row["bytes_per_token"] += t[0, 0].numel() * t.element_size() / rate
    return out


def weight_bytes(artifact: Path) -> int:
    m = json.loads((artifact / "manifest.json").read_text())
    return sum(meta["size"] for rel, meta in m["files"].items() if rel.startswith("weights/"))


def main():
    base = yaml.safe_load((EXAMPLE / "model-fp8.yaml").read_text())
    base["model"]["checkpoint"] = str(EXAMPLE / "checkpoint")
    for key in ("data", "heldout"):
        base["calibration"][key] = str(EXAMPLE / base["calibration"][key])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain = {k: v for k, v in base.items() if k not in ("passes",)}
        (tmp / "bf16.yaml").write_text(yaml.safe_dump({**plain, "passes": []}))
        compile_model(tmp / "bf16.yaml", tmp / "bf16", allow_drift=True)
        bf16_bytes = weight_bytes(tmp / "bf16")
        rows.append({"recipe": "bf16 artifact (reference)", "weight_bytes": bf16_bytes, "ratio_to_bf16": 1.0,
                     "kv_from_allocator": kv_from_allocator(tmp / "bf16")})
        for i, (name, change) in enumerate(RECIPES.items()):
            spec = json.loads(json.dumps(base))
            spec["passes"][0]["fp8"].update(change)
            (tmp / f"r{i}.yaml").write_text(yaml.safe_dump(spec))
            t0 = time.perf_counter()
            result = compile_model(tmp / f"r{i}.yaml", tmp / f"r{i}", allow_drift=True)
            e = result.report["end_to_end"]
            rows.append({"recipe": name, "fp8_options": spec["passes"][0]["fp8"], "compile_seconds": round(time.perf_counter() - t0, 1),
                         **{k: e[k] for k in ("kl_mean", "kl_p99", "top1", "top5", "ppl_reference", "ppl_compiled",
                                              "ppl_increase")},
                         "weight_bytes": weight_bytes(tmp / f"r{i}"),
                         "ratio_to_bf16": round(weight_bytes(tmp / f"r{i}") / bf16_bytes, 4),
                         "gates": result.report["gates"]["results"],
                         "kv_from_allocator": kv_from_allocator(tmp / f"r{i}")})
    print(f"{'recipe':58} {'KL':>8} {'top-1':>7} {'top-5':>7} {'ppl ref->compiled':>20} {'bytes':>7} {'CSA KV B/tok':>12}")
    for r in rows:
        csa = r["kv_from_allocator"].get("CSA entries", {}).get("bytes_per_token", 0)
        if "kl_mean" in r:
            print(f"{r['recipe']:58} {r['kl_mean']:8.5f} {r['top1']:7.2%} {r['top5']:7.2%} "
                  f"{r['ppl_reference']:8.3f}->{r['ppl_compiled']:8.3f} ({r['ppl_increase']:+.2%}) "
                  f"{r['ratio_to_bf16']:6.3f}x {csa:12.1f}")
        else:
            print(f"{r['recipe']:58} {'':8} {'':7} {'':7} {'':>20} {r['ratio_to_bf16']:6.3f}x {csa:12.1f}")
    out = ROOT / "bench" / "results" / "fp8_tiny_v4.json"
    out.write_text(json.dumps({"benchmark": "fp8_tiny_v4", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                               "heldout": base["calibration"], "results": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

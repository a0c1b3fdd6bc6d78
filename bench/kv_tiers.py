"""Decode speed with the CSA entries on the host tier against all-device, side by side.

Compiles examples/tiny-v4 twice for a 2048-token context: without tier budgets (everything on the
device tier) and with a device budget that holds every always-read family plus a page pool of a
quarter of the CSA pages (so the CSA entries live on the host tier and only the indexer's picks are
fetched). For each, prefill a 1536-token prompt (not timed), then time 64 greedy decode steps;
5 runs, interleaved, median and spread. Also checks that both produce the same tokens.

    .venv/bin/python bench/kv_tiers.py
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fp8_tiny_v4 import machine  # noqa: E402
from v4c.compile import compile_model  # noqa: E402
from v4c.runtime.artifact import open_artifact  # noqa: E402

CONTEXT, PROMPT, NEW, RUNS = 2048, 1536, 64, 5


def build(tmp: Path, name: str, tiers: dict):
    (tmp / f"{name}.yaml").write_text(
        f"model:\n  checkpoint: {ROOT / 'examples/tiny-v4/checkpoint'}\nkv:\n  max_context: {CONTEXT}\n"
        f"  prefill_chunk: 256\n  page_tokens: 64\n  tiers: {json.dumps(tiers)}\n")
    compile_model(tmp / f"{name}.yaml", tmp / name)
    return open_artifact(tmp / name)


def decode(art, prompt: list[int]) -> tuple[float, list[int], dict]:
    session = art.session()
    logits = session.forward(torch.tensor([prompt]))[0, -1]
    out, t0 = [], time.perf_counter()
    for _ in range(NEW):
        token = int(torch.argmax(logits))
        out.append(token)
        logits = session.forward(torch.tensor([[token]]))[0, -1]
    seconds = time.perf_counter() - t0
    report = session.tiers.report()
    session.close()
    return NEW / seconds, out, report


def main():
    torch.set_num_threads(2)
    text = (ROOT / "examples/tiny-v4/data/heldout.txt").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full = build(tmp, "device", {})
        plan = json.loads((tmp / "device/plans/kv.json").read_text())
        csa = [s for s in plan["slots"].values() if s["family"] == "CSA entries"]
        fixed = plan["session_bytes"] - sum(s["bytes"] for s in csa)
        page = 64 // csa[0]["tokens_per_entry"] * csa[0]["entry_bytes"]
        pool = sum(s["entries"] for s in csa) // (64 // csa[0]["tokens_per_entry"]) // 4
        tiered = build(tmp, "host", {"device": fixed + pool * page})
        prompt = tiered.tokenizer().encode(text).ids[:PROMPT]
        rates = {"device": [], "host": []}
        tokens, reports = {}, {}
        for _ in range(RUNS):
            for name, art in (("device", full), ("host", tiered)):
                rate, out, report = decode(art, prompt)
                rates[name].append(rate)
                tokens[name], reports[name] = out, report
    med = {k: statistics.median(v) for k, v in rates.items()}
    overhead = med["device"] / med["host"] - 1
    result = {"benchmark": "kv_tiers", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "model": "examples/tiny-v4", "context": CONTEXT, "prompt_tokens": PROMPT, "new_tokens": NEW, "runs": RUNS,
              "device_pool_pages": pool, "csa_pages_total": sum(s["entries"] for s in csa) // (64 // csa[0]["tokens_per_entry"]),
              "decode_tokens_per_s": {k: {"median": round(med[k], 2), "min": round(min(v), 2), "max": round(max(v), 2)}
                                      for k, v in rates.items()},
              "host_tier_overhead": round(overhead, 4), "same_tokens": tokens["device"] == tokens["host"],
              "tiers_host_run": reports["host"]}
    print(f"decode tokens/s, median of {RUNS} (min-max):")
    for k, v in result["decode_tokens_per_s"].items():
        print(f"  {k:7} {v['median']:8.2f}  ({v['min']:.2f}-{v['max']:.2f})")
    print(f"host-tier overhead: {overhead:+.1%}; same tokens: {result['same_tokens']}; "
          f"traffic (last host run): {reports['host']['traffic']}")
    out = ROOT / "bench" / "results" / "kv_tiers.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""TVM CPU attention kernel (targets/tvm/attention.py) at the benchmark model's attention shapes, against
the runtime's torch kernel (runtime/kernels/attention.py), outputs checked against it in the same run.

Shapes: H = 16 heads, D = 128 (16 RoPE channels), fp8_split KV (152-byte rows), window 128; sliding
(ring only), CSA (64 selected entries of 512, rate 4), HCA (all closed windows, rate 128). Cases:
decode (B = S = 1, 2048 tokens of context) and prefill chunks of 512 tokens from pos0 = 0 and 2048.
Median (and min) over the calls of the round with the lowest median (best of 3 rounds: the machine
is shared), on all cores and on one (torch.set_num_threads; the kernels' fork-join follows it).
The library is built here (apache-tvm), then timed in a subprocess where `import tvm` fails, loaded
by tvm_ffi alone, as the runtime does.

    .venv/bin/python bench/tvm_attention.py      # writes bench/results/tvm_attention.json
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tvm_gemv import machine

ROOT = Path(__file__).resolve().parents[1]
H, D, ROPE, WINDOW, TOPK = 16, 128, 16, 128, 64
RATES = {"sliding": 0, "csa": 4, "hca": 128}
CASES = [("decode", 1, 2048), ("prefill", 512, 0), ("prefill", 512, 2048)]  # (name, S, pos0)

TIMER = r'''
import json, statistics, sys, time
sys.modules["tvm"] = None  # the runtime never imports tvm
import torch, tvm_ffi
from v4c.runtime.kernels.attention import attention
from v4c.runtime.quant import encode_entries
H, D, ROPE, WINDOW, TOPK, RATES, CASES, THREADS = json.loads(sys.argv[1])
lib = tvm_ffi.load_module(sys.argv[2])
gen = torch.Generator().manual_seed(0)

def timed(call, reps, rounds=3):
    call()
    best = None
    for _ in range(rounds):
        ts = []
        for _ in range(reps):
            t = time.perf_counter(); call(); ts.append(time.perf_counter() - t)
        if best is None or statistics.median(ts) < best[0]:
            best = (statistics.median(ts), min(ts))
    return best

rows = []
for threads, (case, s, pos0), (mode, rate) in [(t, c, m) for t in THREADS for c in CASES for m in RATES.items()]:
    torch.set_num_threads(threads)
    capacity = (pos0 + s) // max(rate, 1) + 1
    ring = encode_entries(torch.randn(1, WINDOW - 1, D, generator=gen), "fp8_split", ROPE)
    entries = encode_entries(torch.randn(1, capacity, D, generator=gen), "fp8_split", ROPE)
    q, kv = torch.randn(1, s, H, D, generator=gen), torch.randn(1, s, D, generator=gen)
    sinks = torch.randn(H, generator=gen)
    selected = torch.randint(0, capacity, (1, s, TOPK), generator=gen)
    out = torch.empty(1, s, H, D)
    args = [q, kv, sinks] + ([selected] if mode == "csa" else []) + [ring] + ([entries] if mode != "sliding" else [])
    f = lib[mode]
    state = (ring.clone(),) if mode == "sliding" else (ring.clone(), entries)
    ref = lambda: attention(q, kv, sinks, selected if mode == "csa" else None, state=state, pos0=pos0, window=WINDOW,
                            rate=rate if mode == "hca" else 0, scale=D ** -0.5, kv_format="fp8_split", rope_dim=ROPE)
    expect = ref()
    f(*args, out, pos0)
    err = ((out - expect).abs().max() / expect.abs().max()).item()
    tvm_t = timed(lambda: f(*args, out, pos0), 1000 if s == 1 else 10)
    torch_t = timed(ref, 100 if s == 1 else 3)
    rows.append({"threads": threads, "case": case, "mode": mode, "S": s, "pos0": pos0, "rel_err": err,
                 "tvm_us": tvm_t[0] * 1e6, "tvm_min_us": tvm_t[1] * 1e6,
                 "torch_us": torch_t[0] * 1e6, "torch_min_us": torch_t[1] * 1e6})
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
print(json.dumps(rows))
'''


def main():
    sys.path.insert(0, str(ROOT))
    import tvm
    from v4c.targets.tvm import build_library
    from v4c.targets.tvm.attention import attention_kernel

    funcs = {mode: attention_kernel(H, D, WINDOW, kv_format="fp8_split", rope_dim=ROPE, mode=mode, topk=TOPK,
                                    rate=rate, scale=D ** -0.5, cores=os.cpu_count()) for mode, rate in RATES.items()}
    config = [H, D, ROPE, WINDOW, TOPK, RATES, CASES, sorted({os.cpu_count(), 1}, reverse=True)]
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_library(funcs, os.path.join(tmp, "attention.so"))
        load_before = os.getloadavg()
        out = subprocess.run([sys.executable, "-c", TIMER, json.dumps(config), lib], check=False,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if out.returncode:
            sys.exit(out.stderr)
        rows = json.loads(out.stdout)
    print(f"{'threads':>7s} {'case':8s} {'mode':8s} {'S':>4s} {'pos0':>5s} {'tvm us':>9s} {'(min)':>9s} "
          f"{'torch us':>10s} {'speedup':>8s} {'rel err':>8s}")
    for r in rows:
        print(f"{r['threads']:7d} {r['case']:8s} {r['mode']:8s} {r['S']:4d} {r['pos0']:5d} {r['tvm_us']:9.1f} "
              f"{r['tvm_min_us']:9.1f} {r['torch_us']:10.1f} {r['torch_us'] / r['tvm_us']:7.1f}x {r['rel_err']:8.1e}")
    result = {"machine": machine(), "tvm": tvm.__version__, "threads": os.cpu_count(), "loadavg_before": load_before,
              "loadavg_after": os.getloadavg(), "shapes": {"heads": H, "dim": D, "rope": ROPE, "window": WINDOW,
                                                           "topk": TOPK, "rates": RATES, "kv_format": "fp8_split"},
              "rows": rows}
    path = ROOT / "bench" / "results" / "tvm_attention.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

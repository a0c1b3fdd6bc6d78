"""How far do the `small` configuration's FP8 prefill logits move under GPU-sized arithmetic differences?
(Random weights, the e2e recipe of bench/triton_gpu.py, prompt 64, the runtime's torch kernels on the CPU.)

    .venv/bin/python bench/fp8_sensitivity.py     # -> bench/results/fp8_sensitivity_small.json

A: exact. B: the attention's queries and new keys rounded to tf32 (10 mantissa bits, as tf32 tensor
cores round their inputs). C: every linear_fp8 output plus Gaussian noise of 1.5e-4 x max / 3 (the
size of the Hopper fp8 tensor-core accumulation error measured in triton_gpu.json's GEMM rows).
Each of B and C against A: max |diff| / max |A| and argmax agreement over the prompt."""
import json
import sys
import tempfile

import torch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from triton_gpu import SMALL, _build
from v4c.runtime.artifact import open_artifact
from v4c.runtime import kernels as K

def tf32(x):
    b = x.float().contiguous().view(torch.int32)
    b = (b + 0xFFF + ((b >> 13) & 1)) & ~0x1FFF
    return b.view(torch.float32)

tmp = Path(tempfile.mkdtemp())
path, model = _build(tmp, "small", SMALL, 64, 4)
art = open_artifact(path)
ids = torch.randint(0, 8192, (1, 64), generator=torch.Generator().manual_seed(2))
def run():
    with torch.no_grad():
        return art.session(1, kernels="torch", device="cpu").forward(ids).float()
a = run()
orig_att = K.KERNELS["attention"]
def att_tf32(q, kv, *args, **kw):
    return orig_att(tf32(q), tf32(kv), *args, **kw)
K.KERNELS["attention"] = att_tf32
b = run()
K.KERNELS["attention"] = orig_att
orig_lin = K.KERNELS["linear_fp8"]
g = torch.Generator().manual_seed(5)
def lin_noise(*args, **kw):
    y = orig_lin(*args, **kw)
    return y + torch.randn(y.shape, generator=g) * 1.5e-4 * y.abs().max() / 3
K.KERNELS["linear_fp8"] = lin_noise
c = run()
def err(x, y):
    return float((x - y).abs().max() / y.abs().max()), float((x.argmax(-1) == y.argmax(-1)).float().mean())
result = {"config": "small", "prompt": 64, "recipe": "fp8 128x128 fp32 scales, dynamic activations group 128, fp8 kv",
          "tf32_attention_inputs": dict(zip(("rel_err", "argmax_agreement"), err(b, a))),
          "noise_1.5e-4_on_linear_fp8": dict(zip(("rel_err", "argmax_agreement"), err(c, a)))}
print(json.dumps(result, indent=1))
(ROOT / "bench" / "results" / "fp8_sensitivity_small.json").write_text(json.dumps(result, indent=1) + "\n")

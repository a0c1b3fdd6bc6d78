"""How far do the `small` configuration's FP8 prefill logits move under GPU-sized arithmetic differences?
(Random weights, the e2e recipe of bench/triton_gpu.py, prompt 64, the runtime's torch kernels on the CPU.)

    .venv/bin/python bench/fp8_sensitivity.py     # -> bench/results/fp8_sensitivity_small.json

A: exact. B: the attention's queries and new keys rounded to tf32 (10 mantissa bits, as tf32 tensor
cores round their inputs). C: every linear_fp8 output plus Gaussian noise of 1.5e-4 x max / 3 (the
size of the Hopper fp8 tensor-core accumulation error measured in triton_gpu.json's GEMM rows).
Each of B and C against A: max |diff| / max |A| and argmax agreement over the prompt."""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from triton_gpu import SMALL, _build, logits_agreement, scratch_dir  # noqa: E402
from v4c.runtime.artifact import open_artifact  # noqa: E402
from v4c.runtime.kernels import KERNELS  # noqa: E402

OUT = ROOT / "bench" / "results" / "fp8_sensitivity_small.json"


def tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to tf32 (10 mantissa bits, nearest even), as fp32."""
    b = x.float().contiguous().view(torch.int32)
    return ((b + 0xFFF + ((b >> 13) & 1)) & ~0x1FFF).view(torch.float32)


def main():
    path, _ = _build(scratch_dir("v4c-fp8-"), "small", SMALL, 64, 4)
    art = open_artifact(path)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(2))

    def run(**replaced):
        saved = {op: KERNELS[op] for op in replaced}
        KERNELS.update(replaced)
        try:
            with torch.no_grad():
                return art.session(1, kernels="torch", device="cpu").forward(ids).float()
        finally:
            KERNELS.update(saved)

    attention, linear_fp8, g = KERNELS["attention"], KERNELS["linear_fp8"], torch.Generator().manual_seed(5)

    def noisy_linear_fp8(*args, **kw):
        y = linear_fp8(*args, **kw)
        return y + torch.randn(y.shape, generator=g) * 1.5e-4 * y.abs().max() / 3

    exact = run()
    result = {"config": "small", "prompt": 64,
              "recipe": "fp8 128x128 fp32 scales, dynamic activations group 128, fp8 kv",
              "tf32_attention_inputs": logits_agreement(
                  run(attention=lambda q, kv, *a, **kw: attention(tf32(q), tf32(kv), *a, **kw)), exact),
              "noise_1.5e-4_on_linear_fp8": logits_agreement(run(linear_fp8=noisy_linear_fp8), exact)}
    print(json.dumps(result, indent=1))
    OUT.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

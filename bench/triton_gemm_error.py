"""On a CUDA GPU: the triton FP8 GEMM and the torch reference on the same GPU, each against a float64
reference computed on the CPU, at V4-Flash shapes; and how many activations the torch reference
quantizes differently on CUDA than on the CPU.

    python3 bench/triton_gemm_error.py
"""
import torch

from v4c.runtime.quant import dequant_fp8, fake_quant_act, quant_fp8
from v4c.targets.triton.kernels.gemm import linear_fp8
ACT = {"mode": "dynamic", "group": 128, "scale_format": "fp32"}
g = torch.Generator().manual_seed(0)
for n, k, m in ((1024, 4096, 4096), (1024, 4096, 128), (32768, 1024, 4096)):
    q, s = quant_fp8(torch.randn(n, k, generator=g) * 0.02, (128, 128))
    x = torch.randn(m, k, generator=g)
    ours = linear_fp8(x.cuda(), q.cuda(), s.cuda(), block=(128, 128), act=ACT).cpu().double()
    xq_cpu = fake_quant_act(x, ACT)
    xq_gpu = fake_quant_act(x.cuda(), ACT).cpu()
    w = dequant_fp8(q, s, (128, 128)).double()
    ref64 = xq_cpu.double() @ w.T
    ref_gpu = torch.nn.functional.linear(xq_gpu.cuda(), w.float().cuda()).cpu().double()
    e = lambda a, b: float((a - b).abs().max() / b.abs().max())
    print(n, k, m, "ours-vs-f64", e(ours, ref64), "gpuref-vs-f64", e(ref_gpu, ref64),
          "xq gpu!=cpu elems", int((xq_gpu != xq_cpu).sum()), "tf32", torch.backends.cuda.matmul.allow_tf32)

"""Run the kernels' GPU branches (NATIVE: hardware casts, bf16 tensor-core dots) under TRITON_INTERPRET=1.

The launchers pass NATIVE=native_cvt(device), true only on a CUDA device, because Triton 3.9's interpreter
gets three operations wrong that an NVIDIA GPU gets right (checked against its code, and by
`test_triton_native.py::test_the_interpreter_needs_the_shim`):
- fp32 -> bf16 (`x.to(tl.bfloat16)`, cvt.rn.bf16 on a GPU) truncates instead of rounding to nearest even;
- fp32 -> e4m3 (`x.to(tl.float8e4nv)`, cvt.rn.satfinite on a GPU) rounds ties away from zero, and a mantissa
  that rounds up past 0b111 is OR-ed into the exponent field (1.9375 becomes 1.0, not 2.0);
- `tl.dot` of bf16 tiles multiplies the raw 16-bit patterns as integers.
So the NATIVE branches were only ever run on a lent GPU. `gpu_arithmetic()` patches those three operations
of the interpreter's builder with a GPU's results (torch's casts: round to nearest even, the e4m3 one
saturating as satfinite does; bf16 dots as fp32 dots of the exact bf16 values, fp32 accumulation), and
`as_gpu(modules)` makes the launchers take their GPU decisions (native_cvt true). What stays different from
a GPU: the order of fp32 sums, and Hopper's fp8 wgmma accumulator (the kernels promote it to fp32 every
K tile; the interpreter's is exact fp32).
"""

import contextlib
import sys

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter

from v4c.runtime.quant import E4M3_MAX


def _f32(handle) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(handle.data, dtype=np.float32))


def _dot_operand(handle) -> np.ndarray:
    """fp32 values of a dot operand, C-contiguous as the interpreter's own casts leave them (numpy's matmul sums
    in another order for a transposed layout, and the interpreter branches are compared bit for bit)."""
    data = np.ascontiguousarray(handle.data)
    if handle.dtype.scalar == tl.bfloat16:
        return (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32)


@contextlib.contextmanager
def gpu_arithmetic():
    """The interpreter's fp32 -> bf16 / e4m3 casts and bf16 dots as a GPU computes them (see the module doc)."""
    builder = interpreter.InterpreterBuilder
    cast_impl, fp_to_fp, dot = builder.cast_impl, builder.create_fp_to_fp, builder.create_dot

    def cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = _f32(src).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits.reshape(src.data.shape), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    def to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            codes = _f32(src).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
            return interpreter.TensorHandle(codes.reshape(src.data.shape), tl.float8e4nv)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):
            out = np.matmul(_dot_operand(a), _dot_operand(b), dtype=np.float32) + d.data
            return interpreter.TensorHandle(out, d.dtype.scalar)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.cast_impl, builder.create_fp_to_fp, builder.create_dot = cast, to_fp, create_dot
    try:
        yield
    finally:
        builder.cast_impl, builder.create_fp_to_fp, builder.create_dot = cast_impl, fp_to_fp, dot


def kernel_modules() -> list:
    """Every loaded module of kernels that asks native_cvt or sm_count: the target's, and artifacts' own copies."""
    return [m for m in list(sys.modules.values())
            if m is not None and "kernels" in getattr(m, "__name__", "")
            and any(callable(getattr(m, fact, None)) for fact in ("native_cvt", "sm_count"))]


def as_gpu(monkeypatch, modules=None, sms: int = 0) -> None:
    """The launchers' decisions as on a GPU in `modules` (default: kernel_modules()): native_cvt true (hardware
    casts, bf16 attention dots by default), no id range checks on the host (common.HOST_CHECKS false, for the
    modules that define it) and, with sms, sm_count (the split heuristics; an H100 has 132)."""
    for mod in modules if modules is not None else kernel_modules():
        if callable(getattr(mod, "native_cvt", None)):
            monkeypatch.setattr(mod, "native_cvt", lambda device: True)
        if hasattr(mod, "HOST_CHECKS"):
            monkeypatch.setattr(mod, "HOST_CHECKS", False)
        if sms and callable(getattr(mod, "sm_count", None)):
            monkeypatch.setattr(mod, "sm_count", lambda device: sms)

"""The dtype names v4c writes in IR text, programs and manifests, and their torch dtypes."""

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32,
    "bf16": torch.bfloat16,
    "f16": torch.float16,
    "i64": torch.int64,
    "i32": torch.int32,
    "i8": torch.int8,
    "u8": torch.uint8,
    "f8e4m3": torch.float8_e4m3fn,
    "f8e8m0": torch.float8_e8m0fnu,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
FLOAT_NAMES = ("f32", "bf16", "f16")


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in NAMES:
        raise ValueError(f"dtype {dtype} has no v4c name; supported: {', '.join(map(str, NAMES))}")
    return NAMES[dtype]


def torch_dtype(name: str) -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]

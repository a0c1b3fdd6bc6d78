"""Write an artifact directory deterministically and atomically, one weight in memory at a time.

Everything is written into a hidden sibling `.NAME.partial-PID`, hashed into the manifest, and
renamed into place only when complete; a failed or killed compile leaves the destination as it
was (and its partial directory is removed by the next compile to the same place).
"""

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from v4c.ir import Module, load_weight, print_module
from v4c.runtime.artifact import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file
from v4c.runtime.errors import V4CError
from v4c.runtime.program import Program

Progress = Callable[[str, int, int], None]  # (task, done, total)
SHARD_BYTES = 1 << 30


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                      torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3",
                      torch.float8_e8m0fnu: "F8_E8M0"}


def _nbytes(t) -> int:
    n = 1
    for d in t.shape:
        n *= d
    return n * t.dtype.itemsize


def _shards(module: Module, shard_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name in module.params:
        n = _nbytes(module.weights[name])
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    return shards + [current] if current else shards


def _write_safetensors(path: Path, names: list[str], weights: dict, progress: Callable[[int], None]) -> None:
    """Write one safetensors file, loading one tensor at a time (the header comes from the
    sources' shapes and dtypes). Larger dtypes first keeps every tensor naturally aligned."""
    names = sorted(names, key=lambda n: (-weights[n].dtype.itemsize, n))
    header, offset = {}, 0
    for name in names:
        w = weights[name]
        header[name] = {"dtype": SAFETENSORS_DTYPES[w.dtype], "shape": list(w.shape),
                        "data_offsets": [offset, offset + _nbytes(w)]}
        offset += _nbytes(w)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name in names:
            t = load_weight(weights[name]).contiguous()
            f.write(t.view(-1).view(torch.uint8).numpy().data)
            progress(_nbytes(t))
            del t


def _write_weights(tmp: Path, module: Module, shard_bytes: int, progress: Progress | None) -> list[str]:
    (tmp / "weights").mkdir()
    shards = _shards(module, shard_bytes)
    total, done, files = sum(_nbytes(w) for w in module.weights.values()), 0, []

    def advance(n: int):
        nonlocal done
        done += n
        if progress:
            progress("writing weights", done, total)

    for i, names in enumerate(shards):
        rel = f"weights/shard-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(tmp / rel, names, module.weights, advance)
        files.append(rel)
    return files


def _remove_stale_partials(dest: Path) -> None:
    stale = list(dest.parent.glob(f".{dest.name}.partial-*")) + list(dest.parent.glob(f".{dest.name}.old-*"))
    for p in stale:
        pid = p.name.rsplit("-", 1)[-1]
        alive = pid.isdigit() and Path(f"/proc/{pid}").exists() and int(pid) != os.getpid()
        if not alive:
            shutil.rmtree(p, ignore_errors=True)


def write_artifact(dest, module: Module, program: Program, manifest: dict, *, extra_files: dict[str, Path | bytes],
                   progress: Progress | None = None, shard_bytes: int = SHARD_BYTES) -> dict:
    """Write `module`'s weights, IR, program, `extra_files` (artifact path -> source file or
    contents) and the manifest (completed with format, weights and file hashes) to `dest`."""
    dest = Path(dest).resolve()
    if dest.exists() and not (dest.is_dir() and ((dest / MANIFEST).is_file() or not any(dest.iterdir()))):
        raise V4CError(f"{dest} exists and is not a v4c artifact; refusing to replace it (choose another -o)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(dest)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / "module.v4ir").write_text(print_module(module))
        (tmp / "program.json").write_text(program.to_json())
        weights = _write_weights(tmp, module, shard_bytes, progress)
        for rel, src in sorted(extra_files.items()):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, bytes):
                (tmp / rel).write_bytes(src)
            else:
                shutil.copyfile(src, tmp / rel)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        for rel in files:
            os.chmod(tmp / rel, 0o644)  # readable by the fleet's service user; safetensors writes 0600
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
                    "module": "module.v4ir", "program": "program.json", "weights": weights,
                    "files": {rel: {"size": (tmp / rel).stat().st_size, "sha256": sha256_file(tmp / rel)}
                              for rel in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        os.chmod(tmp / MANIFEST, 0o644)
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _swap_into_place(tmp: Path, dest: Path) -> None:
    if not dest.exists():
        os.rename(tmp, dest)
        return
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)

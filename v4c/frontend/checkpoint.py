"""Open a checkpoint directory: config, tensor index, layout, and lazy canonical weights.

Nothing is read until a weight is loaded: tensors come from memory-mapped safetensors, one at a
time. FP8 e4m3 weights (with their block scales) and FP4 e2m1 experts are dequantized to fp32
when loaded; release-layout experts are stacked into the canonical [E, ...] tensors.
"""

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from v4c.ir.module import WeightSource
from v4c.runtime.config import ConfigError, ModelConfig
from v4c.runtime.errors import V4CError
from v4c.runtime.quant import dequant_fp4, dequant_fp8, infer_block

from . import names
from .configs import read_config

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu, "BOOL": torch.bool}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class CheckpointError(V4CError):
    pass


class Checkpoint:
    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint {self.path} is not a directory")
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{self.path} has no config.json; a checkpoint directory needs its config")
        try:
            self.raw_config = json.loads(cfg_path.read_text())
            self.config: ModelConfig = read_config(self.raw_config)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
        except ConfigError as e:
            raise CheckpointError(f"{cfg_path}: {e}") from None
        self._files = self._index()
        self._handles = {}
        # Reported, not used for mapping: one rename table serves every naming (see names.py).
        self.layout = "hf" if any(k.startswith("model.") for k in self._files) else "release"
        self.block_hint = (self.raw_config.get("quantization_config") or {}).get("weight_block_size")
        self.sources, self.origins, self.unused = self._canonical()
        self.tokenizer_files = [self.path / f for f in TOKENIZER_FILES if (self.path / f).is_file()]

    # tensor index -------------------------------------------------------------------------------
    def _index(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {n: self.path / f for n, f in weight_map.items()}
            missing = sorted({str(f) for f in files.values() if not f.is_file()})
            if missing:
                raise CheckpointError(f"{index.name} names shard files that do not exist: {missing[:3]}")
            return files
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.path} has no *.safetensors files")
        files = {}
        for shard in shards:
            with safe_open(shard, "pt") as f:
                files.update({k: shard for k in f.keys()})
        return files

    def _handle(self, name: str):
        file = self._files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, "pt")
        return self._handles[file]

    def meta(self, name: str) -> tuple[tuple, torch.dtype]:
        sl = self._handle(name).get_slice(name)
        return tuple(sl.get_shape()), SAFETENSORS_DTYPES[sl.get_dtype()]

    def tensor(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    # canonical weights --------------------------------------------------------------------------
    def _scale_of(self, name: str) -> str | None:
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        for suffix in names.SCALE_SUFFIXES:
            if base + suffix in self._files:
                return base + suffix
        return None

    def _dense(self, name: str) -> WeightSource:
        """One checkpoint tensor as a source, dequantized to fp32 if FP8 / FP4."""
        shape, dtype = self.meta(name)
        scale = self._scale_of(name)
        if dtype == torch.float8_e4m3fn:
            if scale is None:
                raise CheckpointError(f"tensor {name} is FP8 e4m3 but has no block scale ({name[:-7]}.scale)")
            scale_shape, _ = self.meta(scale)
            block = infer_block(shape, scale_shape, self.block_hint)
            if block is None:
                raise CheckpointError(f"tensor {name} {list(shape)}: its scale {scale} {list(scale_shape)} fits "
                                      "no known block (128x128, 1x32, 1x128, or quantization_config.weight_block_size)")
            return WeightSource(shape, torch.float32, lambda: dequant_fp8(self.tensor(name), self.tensor(scale), block),
                                f"{name} (FP8 e4m3, {block[0]}x{block[1]} blocks)")
        if dtype in (torch.int8, torch.uint8) and scale is not None:
            out_shape = (shape[0], 2 * shape[1])
            return WeightSource(out_shape, torch.float32, lambda: dequant_fp4(self.tensor(name), self.tensor(scale)),
                                f"{name} (FP4 e2m1)")
        if name.endswith("tid2eid"):  # routing tables are stored as int32 whatever the source width
            return WeightSource(shape, torch.int32, lambda: self.tensor(name).to(torch.int32), name)
        return WeightSource(shape, dtype, lambda: self.tensor(name), name)

    def _stacked_experts(self, layer: int, parts: dict) -> dict[str, WeightSource]:
        count = max(e for e, _ in parts) + 1
        missing = [f"layers.{layer}.ffn.experts.{e}.{w}.weight" for e in range(count) for w in ("w1", "w2", "w3")
                   if (e, w) not in parts]
        if missing:
            raise CheckpointError(f"expert tensors missing: {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        src = {key: self._dense(name) for key, name in parts.items()}
        dtypes = {s.dtype for s in src.values()}
        if len(dtypes) != 1:
            raise CheckpointError(f"layer {layer} experts mix dtypes {sorted(map(str, dtypes))}")
        dtype = dtypes.pop()
        w1, w2 = src[(0, "w1")], src[(0, "w2")]
        prefix = f"layers.{layer}.mlp.experts."
        return {
            prefix + "gate_up_proj": WeightSource(
                (count, 2 * w1.shape[0], w1.shape[1]), dtype,
                lambda: torch.stack([torch.cat([src[(e, "w1")].load(), src[(e, "w3")].load()]) for e in range(count)]),
                f"layers.{layer}.ffn.experts.*.w1/w3"),
            prefix + "down_proj": WeightSource(
                (count,) + w2.shape, dtype, lambda: torch.stack([src[(e, "w2")].load() for e in range(count)]),
                f"layers.{layer}.ffn.experts.*.w2"),
        }

    def _canonical(self):
        sources, origins, unused = {}, {}, {}
        scales = {s for n in self._files if (s := self._scale_of(n)) and s != n}
        experts = defaultdict(dict)
        for name in sorted(self._files):
            if name in scales:
                continue
            reason = names.unused_reason(name)
            if reason:
                unused[name] = reason
                continue
            canonical = names.to_canonical(name)
            m = names.EXPERT.match(canonical)
            if m:
                experts[int(m.group(1))][(int(m.group(2)), m.group(3))] = name
                continue
            if canonical in sources:
                raise CheckpointError(f"tensors {origins[canonical]} and {name} both map to {canonical}")
            sources[canonical] = self._dense(name)
            origins[canonical] = name
        for layer, parts in experts.items():
            for canonical, src in self._stacked_experts(layer, parts).items():
                if canonical in sources:
                    raise CheckpointError(f"layer {layer} has both per-expert tensors and {origins[canonical]}")
                sources[canonical] = src
                origins[canonical] = src.origin
        return sources, origins, unused

    def weight(self, canonical: str, shape) -> WeightSource:
        """The source of a canonical weight, checked against the shape the config implies."""
        src = self.sources.get(canonical)
        if src is None:
            raise CheckpointError(f"checkpoint {self.path} lacks tensor {self._source_name(canonical)} "
                                  f"(v4c name {canonical}), expected shape {list(shape)}")
        if tuple(src.shape) != tuple(shape):
            raise CheckpointError(f"tensor {self.origins[canonical]} has shape {list(src.shape)}, but the config "
                                  f"implies {list(shape)} for {canonical}")
        return src

    def _source_name(self, canonical: str) -> str:
        if ".mlp.experts." in canonical:
            return canonical.replace(".mlp.experts.", ".ffn.experts.<e>.").replace("gate_up_proj", "w1/w3.weight") \
                .replace("down_proj", "w2.weight")
        return f"{names.to_release(canonical)} or model.{canonical}"

    def unexpected(self, used: set[str]) -> list[str]:
        """Checkpoint tensors the model does not use and the layout table does not list as unused."""
        return sorted(self.origins[c] for c in self.sources if c not in used)

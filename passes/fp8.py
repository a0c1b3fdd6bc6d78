"""FP8 compilation: block-scaled e4m3 weights (FP4 e2m1 experts optional), FP8 activations
(dynamic per-token groups or static calibrated scales), and FP8 KV entries in DeepSeek's split layout.

    linear(x, @W)             -> linear_fp8(x, @W:e4m3, @W.scale) {block, act}
    grouped_linear(x, @W)     -> grouped_linear_fp8(x, @W:e4m3, @W.scale) {groups, block, act}
    embed(t, @W)              -> embed_fp8(t, @W:e4m3, @W.scale) {block}
    moe_experts(.., @GU, @D)  -> moe_experts_q(.., @GU, @GU.scale, @D, @D.scale) {format, block, down_block, act_in, act_mid}
    compress / attention      -> what `attention` reads (window ring, compressed entries) stored as `kv`
    compress / index_topk     -> the indexer keys stored as `indexer`

With `fake_quant: true` the same numbers come from fp32 weights (quantized, then dequantized) and
explicit `fake_quant` ops on the activations: the reference path the real-storage kernels are
tested against. Weights are quantized lazily, when the artifact writer loads them.
"""

import fnmatch
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from v4c.ir import Instr, Module, ParamRef, TensorType, Value, WeightSource, load_weight
from v4c.ir.ops import OPS
from v4c.runtime.dtypes import FLOAT_NAMES
from v4c.runtime.quant import (cdiv, dequant_fp4, dequant_fp8, entry_layout, fp4_scales, fp8_scales, quant_fp4,
                               quant_fp8)

# Kept in higher precision by default, as DeepSeek's checkpoints ship them.
DEFAULT_SKIP = ["*.mlp.gate.*", "*.compressor.kv_proj.*", "*.compressor.gate_proj.*",
                "*.compressor.indexer.kv_proj.*", "*.compressor.indexer.gate_proj.*",
                "*.indexer.scorer.weights_proj.*", "embed_tokens.*", "lm_head.*"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WeightOptions(_Strict):
    block: list[int] | Literal["channel", "tensor"] = Field(
        [128, 128], description="[rows, cols] per scale, `channel` (one scale per output row) or `tensor`")
    scale_format: Literal["fp32", "ue8m0"] = Field("ue8m0", description="ue8m0: power-of-two scales")


class ActivationOptions(_Strict):
    mode: Literal["dynamic", "static", "none"] = Field(
        "dynamic", description="dynamic: per-token groups; static: one calibrated scale per tensor")
    group: int = Field(128, ge=1, description="channels per dynamic scale")
    static_scale: Literal["mse", "amax"] = Field("mse", description="which calibrated scale static mode uses")


class Options(_Strict):
    weights: WeightOptions = WeightOptions()
    experts: Literal["fp8", "fp4", "keep"] = Field("fp8", description="routed experts: fp8, fp4 (e2m1) or keep")
    activations: ActivationOptions = ActivationOptions()
    kv: Literal["fp8", "bf16", "f32"] = Field(
        "fp8", description="attention KV (sliding window and compressed entries); fp8: DeepSeek's split layout")
    indexer: Literal["fp8", "fp4", "bf16", "f32"] = Field(
        "fp8", description="indexer keys; fp8: e4m3 + fp32 scale per 128, fp4: e2m1 + UE8M0 scale per 32")
    skip: list[str] = Field(DEFAULT_SKIP, description="weight-name patterns (fnmatch) kept in higher precision")
    skipped_dtype: Literal["keep", "bf16"] = Field(
        "keep", description="the skipped float matrices: keep the checkpoint's dtype, or store bf16 (as DeepSeek "
        "ships them; halves an fp32 checkpoint's lm_head and compressor reads)")
    fake_quant: bool = Field(False, description="reference path: fp32 dequantized weights + explicit fake_quant ops")


def scale_name(name: str) -> str:
    return (name[: -len(".weight")] if name.endswith(".weight") else name) + ".scale"


def _block(opt: WeightOptions, rows: int, cols: int) -> list[int]:
    if opt.block == "channel":
        return [1, cols]
    if opt.block == "tensor":
        return [rows, cols]
    return list(opt.block)


def _stacked(src, per_matrix):
    """Apply `per_matrix` to each [R, C] matrix of a stacked [E, R, C] weight and stack the results."""
    return lambda: torch.stack([per_matrix(w) for w in load_weight(src).float()])


class _Rewrite:
    def __init__(self, m: Module, o: Options):
        self.m, self.o = m, o
        self.params, self.weights = dict(m.params), dict(m.weights)
        self.done: dict[str, dict] = {}  # weight name -> how it was quantized
        self.skipped: list[str] = []
        self.fresh = 0
        self.act_stats = m.stats.get("calibration", {}).get("activations", {})

    def wanted(self, name: str, rank: int) -> bool:
        t = self.params[name]
        if t.dtype not in FLOAT_NAMES or t.rank != rank:
            return False
        if any(fnmatch.fnmatchcase(name, p) for p in self.o.skip):
            if name not in self.skipped:
                self.skipped.append(name)
                if self.o.skipped_dtype == "bf16" and t.dtype == "f32" and t.rank >= 2:
                    src = self.weights[name]
                    self._set(name, t.shape, torch.bfloat16, lambda: load_weight(src).to(torch.bfloat16))
            return False
        return True

    def act(self, weight: str) -> dict:
        a = self.o.activations
        if a.mode == "dynamic":
            return {"mode": "dynamic", "group": a.group, "scale_format": self.o.weights.scale_format}
        if a.mode == "none":
            return {"mode": "none"}
        if weight not in self.act_stats:
            raise ValueError(f"static activations need calibration statistics for {weight}; add a calibration "
                             "section to model.yaml (it runs the calibrate pass before fp8)")
        return {"mode": "static", "scale": self.act_stats[weight][f"{a.static_scale}_scale"]}

    def dense(self, name: str) -> list[int]:
        """Quantize a 2-D weight (once, even if several ops use it); -> its block."""
        if name in self.done:
            return self.done[name]["block"]
        rows, cols = self.params[name].shape
        block, fmt, src = _block(self.o.weights, rows, cols), self.o.weights.scale_format, self.weights[name]
        if self.o.fake_quant:
            self._set(name, (rows, cols), torch.float32,
                      lambda: dequant_fp8(*quant_fp8(load_weight(src).float(), block, fmt), block))
        else:
            grid = (cdiv(rows, block[0]), cdiv(cols, block[1]))
            self._set(name, (rows, cols), torch.float8_e4m3fn, lambda: quant_fp8(load_weight(src).float(), block, fmt)[0])
            self._set(scale_name(name), grid, torch.float32 if fmt == "fp32" else torch.float8_e8m0fnu,
                      lambda: fp8_scales(load_weight(src).float(), block, fmt))
        self.done[name] = {"format": "fp8", "block": block, "scale_format": fmt, "scale": scale_name(name)}
        return block

    def experts(self, name: str, fmt: str) -> list[int]:
        e, rows, cols = self.params[name].shape
        src, sfmt = self.weights[name], self.o.weights.scale_format
        block = _block(self.o.weights, rows, cols)
        if fmt == "fp4" and cols % 2:
            raise ValueError(f"{name}: FP4 packs two values per byte; {cols} input columns is odd")
        if self.o.fake_quant:
            deq = (lambda w: dequant_fp4(*quant_fp4(w))) if fmt == "fp4" else \
                (lambda w: dequant_fp8(*quant_fp8(w, block, sfmt), block))
            self._set(name, (e, rows, cols), torch.float32, _stacked(src, deq))
        elif fmt == "fp4":
            self._set(name, (e, rows, cols // 2), torch.int8, _stacked(src, lambda w: quant_fp4(w)[0]))
            self._set(scale_name(name), (e, rows, cdiv(cols, 32)), torch.float8_e8m0fnu, _stacked(src, fp4_scales))
        else:
            self._set(name, (e, rows, cols), torch.float8_e4m3fn, _stacked(src, lambda w: quant_fp8(w, block, sfmt)[0]))
            self._set(scale_name(name), (e, cdiv(rows, block[0]), cdiv(cols, block[1])),
                      torch.float32 if sfmt == "fp32" else torch.float8_e8m0fnu,
                      _stacked(src, lambda w: fp8_scales(w, block, sfmt)))
        self.done[name] = {"format": fmt, "block": block if fmt == "fp8" else [1, 32], "scale_format":
                           sfmt if fmt == "fp8" else "ue8m0", "scale": scale_name(name)}
        return block

    def _set(self, name, shape, dtype, load):
        from v4c.runtime.dtypes import dtype_name
        self.params[name] = TensorType(tuple(shape), dtype_name(dtype))
        self.weights[name] = WeightSource(shape, dtype, load, f"{name} (fp8 pass)")

    def value(self, like: Value) -> Value:
        self.fresh += 1
        return Value(f"q{self.fresh}", like.type)

    def instr(self, op: str, operands: list, results: list[Value], attrs: dict, state=()) -> Instr:
        types = [self.params[o.name] if isinstance(o, ParamRef) else o.type for o in operands]
        inferred = OPS[op].infer(types + [None] * (len(OPS[op].operands) - len(types)),
                                 [self.states[s] for s in state], attrs)
        return Instr(op, operands, [Value(r.name, t) for r, t in zip(results, inferred)], attrs, list(state))

    def kv_formats(self) -> dict[str, tuple[str, int]]:
        """State slot -> (storage format, RoPE channels): what `attention` reads (window ring and
        compressed entries) takes `kv`, what `index_topk` reads (indexer keys) takes `indexer`."""
        kv = {"fp8": "fp8_split", "bf16": "bf16", "f32": "f32"}[self.o.kv]
        keys = {"fp8": "fp8_block", "fp4": "fp4_block", "bf16": "bf16", "f32": "f32"}[self.o.indexer]
        rope = self.m.config["rope_head_dim"]
        out = {}
        for ins in self.m.func.body:
            if ins.op == "attention":
                out.update({s: (kv, rope) for s in ins.state})
            elif ins.op == "index_topk":
                out[ins.state[0]] = (keys, 0)
        return {s: f for s, f in out.items() if f[0] != "f32"}

    def run(self) -> Module:
        o, body = self.o, []
        self.states = dict(self.m.states)
        formats = self.kv_formats()
        for name, (fmt, rope) in formats.items():
            t = self.states[name]
            dtype, width = entry_layout(fmt, t.shape[2], rope)
            self.states[name] = TensorType((*t.shape[:2], width), dtype)
        for ins in self.m.func.body:
            w = ins.operands[1] if len(ins.operands) > 1 and isinstance(ins.operands[1], ParamRef) else None
            if ins.op in ("linear", "grouped_linear") and w and self.wanted(w.name, 2):
                block, act = self.dense(w.name), self.act(w.name)
                extra = {"groups": ins.attrs["groups"]} if ins.op == "grouped_linear" else {}
                if o.fake_quant:
                    xq = self.value(ins.operands[0])
                    body.append(Instr("fake_quant", [ins.operands[0]], [xq], {"act": act}))
                    body.append(Instr(ins.op, [xq, w], ins.results, dict(ins.attrs)))
                else:
                    body.append(self.instr(f"{ins.op}_fp8", [ins.operands[0], w, ParamRef(scale_name(w.name))],
                                           ins.results, {**extra, "block": block, "act": act}))
            elif ins.op == "embed" and self.wanted(ins.operands[1].name, 2):
                block = self.dense(ins.operands[1].name)
                body.append(ins if o.fake_quant else self.instr(
                    "embed_fp8", [ins.operands[0], ins.operands[1], ParamRef(scale_name(ins.operands[1].name))],
                    ins.results, {"block": block}))
            elif ins.op == "moe_experts" and o.experts != "keep" and self.wanted(ins.operands[3].name, 3) \
                    and self.wanted(ins.operands[4].name, 3):
                gu, down = ins.operands[3].name, ins.operands[4].name
                block, down_block = self.experts(gu, o.experts), self.experts(down, o.experts)
                acts = {"act_in": self.act(gu), "act_mid": self.act(down)}
                if o.fake_quant:
                    body.append(Instr("moe_experts", ins.operands, ins.results, {**ins.attrs, **acts}))
                else:
                    body.append(self.instr("moe_experts_q", ins.operands[:4] + [ParamRef(scale_name(gu)), ins.operands[4],
                                                                              ParamRef(scale_name(down))],
                                           ins.results, {**ins.attrs, "format": o.experts, "block": block,
                                                         "down_block": down_block, **acts}))
            elif ins.op == "compress" and ins.state[-1] in formats:
                body.append(Instr(ins.op, ins.operands, ins.results,
                                  {**ins.attrs, "kv_format": formats[ins.state[-1]][0]}, ins.state))
            elif ins.op == "attention" and ins.state[0] in formats:
                fmt, rope = formats[ins.state[0]]
                body.append(Instr(ins.op, ins.operands, ins.results,
                                  {**ins.attrs, "kv_format": fmt, "rope_dim": rope}, ins.state))
            elif ins.op == "index_topk" and ins.state[0] in formats:
                body.append(Instr(ins.op, ins.operands, ins.results,
                                  {**ins.attrs, "key_format": formats[ins.state[0]][0]}, ins.state))
            else:
                body.append(ins)
        out = self.m.replace(func=type(self.m.func)(self.m.func.inputs, body, self.m.func.output),
                             params=self.params, states=self.states, weights=self.weights)
        kv_fmt = {"fp8": "fp8_split", "bf16": "bf16", "f32": "f32"}[o.kv]
        out.stats["fp8"] = {"weights": self.done, "skipped": self.skipped, "kv": kv_fmt, "indexer": o.indexer,
                            "activations": o.activations.model_dump(), "experts": o.experts, "fake_quant": o.fake_quant}
        out.counters["fp8"] = {"weights_quantized": len(self.done), "weights_skipped": len(self.skipped),
                               "experts": o.experts, "kv": kv_fmt, "indexer": o.indexer,
                               "activations": o.activations.mode}
        return out


def run(m: Module, options: Options, progress=None) -> Module:
    return _Rewrite(m, options).run()

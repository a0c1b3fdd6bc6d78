"""The op registry: one `OpDef` per op, with its operands, state slots, type inference and its
reference implementation (the runtime's torch kernel of the same name).

Type inference (infer.py, infer_quant.py) takes the operand types (None for an omitted optional operand), the
state slot types and the attributes, and returns the result types; it raises `IRTypeError` naming the operand or
slot that does not fit.
"""

from collections.abc import Callable
from dataclasses import dataclass

from v4c.runtime.kernels import KERNELS, STATEFUL

from . import infer, infer_quant


@dataclass(frozen=True)
class OpDef:
    name: str
    operands: tuple[str, ...]  # role names; a trailing "?" marks an optional operand
    infer: Callable  # (operand types, state types, attrs) -> list[TensorType]
    state: Callable[[dict], tuple[str, ...]] = lambda attrs: ()  # state slot roles for these attrs
    attrs: tuple[str, ...] = ()  # required attribute names
    view: bool = False  # the result is a view of operand 0 (no buffer of its own)

    @property
    def reference(self) -> Callable:
        return KERNELS[self.name]

    @property
    def stateful(self) -> bool:
        return self.name in STATEFUL

    @property
    def min_operands(self) -> int:
        return sum(not r.endswith("?") for r in self.operands)


OPS: dict[str, OpDef] = {op.name: op for op in (
    OpDef("embed", ("tokens", "weight"), infer.embed),
    OpDef("linear", ("x", "weight"), infer.linear),
    OpDef("grouped_linear", ("x", "weight"), infer.grouped_linear, attrs=("groups",)),
    OpDef("rms_norm", ("x", "weight?"), infer.rms_norm, attrs=("eps",)),
    OpDef("rope", ("x", "positions", "inv_freq"), infer.rope),
    OpDef("reshape", ("x",), infer.reshape, attrs=("shape",), view=True),
    OpDef("add", ("a", "b"), infer.elementwise),
    OpDef("swiglu", ("gate", "up"), infer.elementwise),
    OpDef("hc_expand", ("x",), infer.hc_expand, attrs=("hc",)),
    OpDef("hc_pre", ("streams", "fn", "base", "scale"), infer.hc_pre, attrs=("iters", "eps", "norm_eps")),
    OpDef("hc_post", ("out", "streams", "post", "comb", "addend?"), infer.hc_post),
    OpDef("hc_post_pre", ("out", "streams", "post", "comb", "fn", "base", "scale", "addend?"), infer.hc_post_pre,
          attrs=("iters", "eps", "norm_eps")),
    OpDef("hc_post_pre_quant", ("out", "streams", "post", "comb", "fn", "base", "scale", "norm_weight", "addend?"),
          infer_quant.hc_post_pre_quant, attrs=("iters", "eps", "norm_eps", "quant")),
    OpDef("hc_head", ("streams", "fn", "base", "scale"), infer.hc_head, attrs=("eps", "norm_eps")),
    OpDef("hc_post_head", ("out", "streams", "post", "comb", "fn", "base", "scale", "addend?"), infer.hc_post_head,
          attrs=("eps", "norm_eps")),
    OpDef("hc_post_head_norm", ("out", "streams", "post", "comb", "fn", "base", "scale", "norm_weight", "addend?"),
          infer.hc_post_head_norm, attrs=("eps", "norm_eps", "norm")),
    OpDef("route_topk", ("x", "weight", "bias"), infer.route_topk, attrs=("k", "score_func", "scale")),
    OpDef("route_hash", ("x", "weight", "table", "tokens"), infer.route_hash, attrs=("score_func", "scale")),
    OpDef("moe_experts", ("x", "weights", "experts", "gate_up", "down"), infer.moe_experts),
    OpDef("compress", ("kv", "gate", "ape", "norm_weight", "inv_freq"), infer.compress, infer.compress_state,
          attrs=("rate", "overlap", "eps")),
    OpDef("compress_pair", ("kv", "gate", "ape", "norm_weight", "inv_freq", "kv2", "gate2", "ape2", "norm_weight2",
                            "inv_freq2"), infer.compress_pair, infer.compress_pair_state, attrs=("first", "second")),
    OpDef("index_topk", ("q", "weights"), infer.index_topk, lambda a: ("entries",),
          attrs=("topk", "rate", "score_scale", "weight_scale")),
    OpDef("rope_index_topk", ("q", "weights", "positions", "inv_freq"), infer.rope_index_topk, lambda a: ("entries",),
          attrs=("topk", "rate", "score_scale", "weight_scale", "q_rope")),
    OpDef("attention", ("q", "kv", "sinks", "selected?"), infer.attention, infer.attention_state,
          attrs=("window", "rate", "scale")),
    OpDef("attention_rope", ("q", "kv", "sinks", "positions", "inv_freq", "selected?"), infer.attention_rope,
          infer.attention_state, attrs=("window", "rate", "scale", "out_rope")),
    OpDef("norm_attention_rope", ("q", "kv", "kv_weight", "sinks", "positions", "inv_freq", "selected?"),
          infer.norm_attention_rope, infer.attention_state, attrs=("window", "rate", "scale", "out_rope", "q_norm", "kv_norm")),
    OpDef("fake_quant", ("x",), infer_quant.fake_quant, attrs=("act",)),
    OpDef("rms_norm_quant", ("x", "weight?"), infer_quant.rms_norm_quant, attrs=("eps", "group", "scale_format")),
    OpDef("rms_norm_rope", ("x", "positions", "inv_freq", "weight?"), infer.rms_norm_rope, attrs=("eps",)),
    OpDef("linear_fp8", ("x", "weight", "scale", "x_scale?"), infer_quant.linear_fp8, attrs=("block", "act")),
    OpDef("swiglu_linear_fp8", ("gate", "up", "weight", "scale"), infer_quant.swiglu_linear_fp8, attrs=("block", "act")),
    OpDef("grouped_linear_fp8", ("x", "weight", "scale"), infer_quant.grouped_linear_fp8, attrs=("groups", "block", "act")),
    OpDef("linear_cat", ("x", "weight"), infer.linear_cat, attrs=("sizes",)),
    OpDef("linear_fp8_cat", ("x", "weight", "scale", "x_scale?"), infer_quant.linear_fp8_cat, attrs=("sizes", "block", "act")),
    OpDef("norm_linear_fp8", ("x", "norm_weight", "weight", "scale"), infer_quant.norm_linear_fp8, attrs=("eps", "block", "act")),
    OpDef("embed_fp8", ("tokens", "weight", "scale"), infer_quant.embed_fp8, attrs=("block",)),
    OpDef("moe_experts_q",
          ("x", "weights", "experts", "gate_up", "gate_up_scale", "down", "down_scale", "x_scale?"), infer_quant.moe_experts_q,
          attrs=("format", "block", "down_block", "act_in", "act_mid")),
    OpDef("moe_experts_q_shared",
          ("x", "weights", "experts", "gate_up", "gate_up_scale", "down", "down_scale", "shared_gate_up",
           "shared_gate_up_scale", "shared_down", "shared_down_scale", "x_scale?"), infer_quant.moe_experts_q_shared,
          attrs=("format", "block", "down_block", "shared_block", "shared_down_block", "act_in", "act_mid")),
)}

missing_kernels = set(OPS) - set(KERNELS)
assert not missing_kernels, f"ops without a reference kernel: {missing_kernels}"

"""The torch kernel table: kernel name -> plain-PyTorch fp32 function.

Stateless kernels are called `fn(*inputs, **attrs)`; stateful ones (in `STATEFUL`) also get
`state=` (their state tensors, mutated in place) and `pos0=` (tokens the session held before
this call). The IR's op registry uses these as the reference implementation of each op.
"""

from .attention import attention, attention_rope, index_topk, norm_attention_rope, rope_index_topk
from .basic import add, embed, grouped_linear, linear, linear_cat, reshape, rms_norm, rms_norm_rope, rope, swiglu
from .compressor import compress, compress_pair
from .hyper import hc_expand, hc_head, hc_post, hc_post_head, hc_post_head_norm, hc_post_pre, hc_pre
from .moe import moe_experts, route_hash, route_topk
from .quantized import (embed_fp8, fake_quant, grouped_linear_fp8, hc_post_pre_quant, linear_fp8, linear_fp8_cat,
                        moe_experts_q, moe_experts_q_shared, norm_linear_fp8, rms_norm_quant, swiglu_linear_fp8)

KERNELS = {
    "embed": embed,
    "linear": linear,
    "grouped_linear": grouped_linear,
    "rms_norm": rms_norm,
    "rope": rope,
    "rms_norm_rope": rms_norm_rope,
    "reshape": reshape,
    "add": add,
    "swiglu": swiglu,
    "hc_expand": hc_expand,
    "hc_pre": hc_pre,
    "hc_post": hc_post,
    "hc_post_pre": hc_post_pre,
    "hc_post_pre_quant": hc_post_pre_quant,
    "hc_head": hc_head,
    "hc_post_head": hc_post_head,
    "hc_post_head_norm": hc_post_head_norm,
    "route_topk": route_topk,
    "route_hash": route_hash,
    "moe_experts": moe_experts,
    "compress": compress,
    "compress_pair": compress_pair,
    "index_topk": index_topk,
    "rope_index_topk": rope_index_topk,
    "attention": attention,
    "attention_rope": attention_rope,
    "norm_attention_rope": norm_attention_rope,
    "fake_quant": fake_quant,
    "rms_norm_quant": rms_norm_quant,
    "linear_fp8": linear_fp8,
    "swiglu_linear_fp8": swiglu_linear_fp8,
    "norm_linear_fp8": norm_linear_fp8,
    "grouped_linear_fp8": grouped_linear_fp8,
    "embed_fp8": embed_fp8,
    "moe_experts_q": moe_experts_q,
    "moe_experts_q_shared": moe_experts_q_shared,
    "linear_cat": linear_cat,
    "linear_fp8_cat": linear_fp8_cat,
}

# the ops that read (and write) a KV ring
ATTENTION = frozenset({"attention", "attention_rope", "norm_attention_rope"})
STATEFUL = frozenset({"compress", "compress_pair", "index_topk", "rope_index_topk"}) | ATTENTION

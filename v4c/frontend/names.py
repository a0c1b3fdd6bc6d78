"""Checkpoint tensor names -> v4c's canonical names: one rename table for DeepSeek-V4.

Canonical names are the Hugging Face module names without `model.`
(`layers.3.self_attn.q_a_proj.weight`, `embed_tokens.weight`, `lm_head.weight`), with routed
experts stacked: `layers.L.mlp.experts.gate_up_proj` [E, 2I, D] (gate rows, then up rows) and
`layers.L.mlp.experts.down_proj` [E, D, I].

Checkpoints name tensors three ways, and the one table maps them all:
- DeepSeek's release layout: `layers.3.attn.wq_a.weight`, `layers.3.ffn.experts.7.w1.weight`, `embed.weight`;
- what transformers' `save_pretrained` writes (its rename rules run backwards, under `model.`):
  `model.layers.3.attn.wq_a.weight`, `model.layers.3.attn.norm.weight`, `head.weight`;
- Hugging Face module names: `model.layers.3.self_attn.q_a_proj.weight` (no rule matches).
The rules are those of transformers' `conversion_mapping["deepseek_v4"]`, applied in order after a
leading `model.` is removed, each at most once per name.
"""

import re

# (release pattern, canonical text), with the reverse (canonical pattern, release text) that writers use.
_RULES = [
    (r"\.attn\.", ".self_attn."),  # layers.L.attn.*      -> layers.L.self_attn.*
    (r"\.ffn\.", ".mlp."),  # layers.L.ffn.*        -> layers.L.mlp.*
    (r"\.indexer\.compressor\.", ".compressor.indexer."),  # indexer's own compressor
    (r"^embed\.weight", "embed_tokens.weight"),
    (r"^head\.weight", "lm_head.weight"),
    (r"^hc_head_fn", "hc_head.hc_fn"),
    (r"^hc_head_base", "hc_head.hc_base"),
    (r"^hc_head_scale", "hc_head.hc_scale"),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_attn_fn", ".attn_hc.fn"),
    (r"\.hc_attn_base", ".attn_hc.base"),
    (r"\.hc_attn_scale", ".attn_hc.scale"),
    (r"\.hc_ffn_fn", ".ffn_hc.fn"),
    (r"\.hc_ffn_base", ".ffn_hc.base"),
    (r"\.hc_ffn_scale", ".ffn_hc.scale"),
    (r"\.attn_sink", ".sinks"),
    (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."),
    (r"\.norm\.", ".kv_norm."),  # compressor norms (and the attention kv norm as transformers saves it)
    (r"\.ape", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
]
# Reverse of the `.norm.` rule: DeepSeek names only the compressor norms `norm` (attention: `kv_norm`).
_REVERSE_OVERRIDES = {r"\.norm\.": (r"(\.compressor\.(?:indexer\.)?)kv_norm\.", r"\1norm.")}

RULES = [(re.compile(src), dst) for src, dst in _RULES]
REVERSE = [(re.compile(_REVERSE_OVERRIDES[src][0]), _REVERSE_OVERRIDES[src][1]) if src in _REVERSE_OVERRIDES
           else (re.compile(("^" if src.startswith("^") else "") + re.escape(dst)),
                 src.lstrip("^").replace("\\", "")) for src, dst in reversed(_RULES)]

# Per-expert tensors (after renaming), stacked into the canonical pair:
#   gate_up_proj[e] = cat(w1[e], w3[e]);  down_proj[e] = w2[e]
EXPERT = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(w[123])\.weight$")

# Tensors a checkpoint may carry that the model does not use (checked against the original name).
UNUSED = [
    (re.compile(r"^(model\.)?mtp\."), "multi-token prediction (MTP) layers"),
    (re.compile(r"rotary_emb\.\w*inv_freq$"), "RoPE frequencies (v4c computes them from the config)"),
]

# Companion tensors of a quantized weight `X.weight`: its block scales.
SCALE_SUFFIXES = (".scale", ".weight_scale_inv")


def to_canonical(name: str) -> str:
    """Apply the rename table to a checkpoint tensor name."""
    name = name.removeprefix("model.")
    for pattern, text in RULES:
        name = pattern.sub(text, name, count=1)
    return name


def to_release(canonical: str) -> str:
    """DeepSeek release name of a (non-expert) canonical name: the table run backwards."""
    name = canonical
    for pattern, text in REVERSE:
        name = pattern.sub(text, name, count=1)
    return name


def unused_reason(name: str) -> str | None:
    for pattern, reason in UNUSED:
        if pattern.search(name):
            return reason
    return None

"""The numerical oracle (transformers' DeepseekV4ForCausalLM) and checkpoint writers for tests.

- `CONFIGS`: tiny V4 configs that together cover every layer / MoE kind and hc_mult 1..4.
- `make_model`: a model with *every* parameter and buffer randomised (transformers initialises
  sinks, position biases, the routing bias, tid2eid and the mHC scales to constants, which would
  hide a missing feature).
- `save_hf` / `save_release`: write the same weights in both layouts; `save_release` can quantize
  to FP8 e4m3 (fp32 or UE8M0 block scales) and FP4 e2m1 experts and returns the weights as stored
  (dequantized), so the oracle can be run on exactly those values.
"""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from v4c.frontend.names import to_release
from v4c.runtime.quant import dequant_fp4, dequant_fp8, quant_fp4, quant_fp8

L = {"s": "sliding_attention", "c": "compressed_sparse_attention", "h": "heavily_compressed_attention"}
M = {"H": "hash_moe", "T": "moe"}


def _cfg(layers: str, mlps: str, **kw) -> dict:
    base = dict(vocab_size=97, hidden_size=48, num_attention_heads=4, head_dim=32, partial_rotary_factor=0.25,
                q_lora_rank=24, n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=20, o_groups=2,
                o_lora_rank=12, index_n_heads=8, index_head_dim=16, index_topk=4, sliding_window=8,
                compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
                hc_mult=2, hc_sinkhorn_iters=20, max_position_embeddings=4096, swiglu_limit=2.0,
                routed_scaling_factor=1.5, eos_token_id=None, bos_token_id=None)
    base.update(kw)
    base.update(num_hidden_layers=len(layers), layer_types=[L[c] for c in layers], mlp_layer_types=[M[c] for c in mlps])
    return base


# Together: all three layer types, hash and top-k MoE, hc_mult 1..4, index_topk below (4, 2) and
# above (96) the number of compressed entries, YaRN on the compressed branches, odd sizes.
CONFIGS = {
    "hc1_topk_small": _cfg("sch", "HTT", hc_mult=1),
    "hc2_yarn": _cfg("chs", "HHT", hc_mult=2, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 32, "beta_slow": 1}),
    "hc3_topk_large": _cfg("hcsc", "TTHT", hc_mult=3, index_topk=96, hidden_size=40, num_attention_heads=3,
                           head_dim=24, partial_rotary_factor=1 / 3, o_groups=3, o_lora_rank=10, sliding_window=11,
                           moe_intermediate_size=14, n_routed_experts=5, num_experts_per_tok=3,
                           compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 9}),
    "hc4_mixed": _cfg("csh", "HTT", hc_mult=4, index_topk=2, index_n_heads=12, hidden_size=56, q_lora_rank=20,
                      sliding_window=16, compress_rates={"compressed_sparse_attention": 4,
                                                         "heavily_compressed_attention": 32}),
}


def make_config(name_or_kwargs) -> DeepseekV4Config:
    kw = CONFIGS[name_or_kwargs] if isinstance(name_or_kwargs, str) else name_or_kwargs
    return DeepseekV4Config(**kw)


@torch.no_grad()
def randomize(model: DeepseekV4ForCausalLM, seed: int) -> DeepseekV4ForCausalLM:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config

    def randn(shape, std=1.0, mean=0.0):
        return torch.randn(shape, generator=g) * std + mean

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            p.copy_(randn(p.shape, 0.2, 1.0))
        elif leaf == "sinks":
            p.copy_(randn(p.shape, 1.0))
        elif leaf == "position_bias":
            p.copy_(randn(p.shape, 0.5))
        elif leaf in ("base", "hc_base"):
            p.copy_(randn(p.shape, 0.5))
        elif leaf in ("scale", "hc_scale"):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif p.dim() >= 2:
            p.copy_(randn(p.shape, 1.0 / math.sqrt(p.shape[-1])))
        else:
            p.copy_(randn(p.shape, 0.5))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(randn(b.shape, 0.1))
        elif name.endswith("tid2eid"):
            b.copy_(torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[: cfg.num_experts_per_tok]
                                 for _ in range(b.shape[0])]))
    return model


def _eager(model: DeepseekV4ForCausalLM) -> DeepseekV4ForCausalLM:
    # transformers' default grouped_mm experts need 16-byte strides; the eager loop is the plain reference.
    model.set_experts_implementation("eager")
    return model.float().eval()


def make_model(name_or_kwargs, seed: int = 0) -> DeepseekV4ForCausalLM:
    torch.manual_seed(seed)
    return randomize(_eager(DeepseekV4ForCausalLM(make_config(name_or_kwargs))), seed)


def canonical_state(model) -> dict[str, torch.Tensor]:
    """The model's weights under v4c's canonical names (HF names without `model.`)."""
    out = {}
    for k, v in model.state_dict().items():
        if "rotary_emb" in k:
            continue
        out[k[len("model."):] if k.startswith("model.") else k] = v.detach().clone()
    return out


def save_hf(model, path) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    return path


# --- release layout -------------------------------------------------------------------------------
# Which canonical weights DeepSeek ships in FP8 (everything else stays bf16 / fp32).
FP8_SUFFIXES = ("q_a_proj.weight", "q_b_proj.weight", "self_attn.kv_proj.weight", "o_a_proj.weight",
                "o_b_proj.weight", "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight",
                "shared_experts.down_proj.weight")
FP32_SUFFIXES = ("sinks", "position_bias", "e_score_correction_bias", "fn", "base", "scale", "hc_fn", "hc_base",
                 "hc_scale")


def release_config(model, *, quantized: bool, fp4_experts: bool) -> dict:
    c = model.config
    rates = c.compress_rates
    assert rates["compressed_sparse_attention"] == 4, "DeepSeek's release config hard-wires CSA ratio 4"
    ratio = {"sliding_attention": 0, "compressed_sparse_attention": 4,
             "heavily_compressed_attention": rates["heavily_compressed_attention"]}
    n_hash = c.mlp_layer_types.count("hash_moe")
    assert c.mlp_layer_types == ["hash_moe"] * n_hash + ["moe"] * (c.num_hidden_layers - n_hash), \
        "the release config can only express hash layers first"
    comp = c.rope_parameters["compress"]
    yarn = comp.get("rope_type") == "yarn"
    out = dict(vocab_size=c.vocab_size, dim=c.hidden_size, moe_inter_dim=c.moe_intermediate_size,
               n_layers=c.num_hidden_layers, n_hash_layers=n_hash, n_mtp_layers=1, n_heads=c.num_attention_heads,
               n_routed_experts=c.n_routed_experts, n_shared_experts=1, n_activated_experts=c.num_experts_per_tok,
               score_func=c.scoring_func, route_scale=c.routed_scaling_factor, swiglu_limit=c.swiglu_limit,
               q_lora_rank=c.q_lora_rank, head_dim=c.head_dim, rope_head_dim=c.qk_rope_head_dim, norm_eps=c.rms_norm_eps,
               o_groups=c.o_groups, o_lora_rank=c.o_lora_rank, window_size=c.sliding_window,
               compress_ratios=[ratio[t] for t in c.layer_types] + [0],
               rope_theta=c.rope_parameters["main"]["rope_theta"], compress_rope_theta=comp["rope_theta"],
               original_seq_len=comp["original_max_position_embeddings"] if yarn else 0,
               rope_factor=comp["factor"] if yarn else 1.0, beta_fast=comp.get("beta_fast", 32),
               beta_slow=comp.get("beta_slow", 1), index_n_heads=c.index_n_heads, index_head_dim=c.index_head_dim,
               index_topk=c.index_topk, hc_mult=c.hc_mult, hc_sinkhorn_iters=c.hc_sinkhorn_iters, hc_eps=c.hc_eps,
               max_seq_len=c.max_position_embeddings, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)
    if quantized:
        out.update(dtype="fp8")
    if fp4_experts:
        out.update(expert_dtype="fp4")
    return out


def save_release(model, path, *, dtype=torch.float32, fp8: str | None = None, block=(128, 128),
                 fp4_experts: bool = False, mtp: bool = True) -> dict[str, torch.Tensor]:
    """Write DeepSeek's release layout. fp8: None | "fp32" | "ue8m0" (scale format).
    Returns the canonical weights exactly as stored (dequantized, fp32)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, stored = {}, {}

    def put(name, canonical_value, fp8_ok, expert=False):
        v = canonical_value.float()
        if expert and fp4_experts:
            q, s = quant_fp4(v)
            tensors[name], tensors[name[:-len(".weight")] + ".scale"] = q, s
            return dequant_fp4(q, s)
        if fp8 and fp8_ok:
            q, s = quant_fp8(v, block, fp8)
            tensors[name], tensors[name[:-len(".weight")] + ".scale"] = q, s
            return dequant_fp8(q, s, block)
        t = canonical_value.to(dtype) if canonical_value.is_floating_point() else canonical_value.to(torch.int32)
        tensors[name] = t.contiguous()
        return t.float() if t.is_floating_point() else t

    for name, v in canonical_state(model).items():
        if ".mlp.experts." in name:
            layer = name.split(".")[1]
            parts = []
            for e in range(v.shape[0]):
                pre = f"layers.{layer}.ffn.experts.{e}."
                if name.endswith("gate_up_proj"):
                    gate, up = v[e].chunk(2)
                    parts.append(torch.cat([put(pre + "w1.weight", gate, True, True), put(pre + "w3.weight", up, True, True)]))
                else:
                    parts.append(put(pre + "w2.weight", v[e], True, True))
            stored[name] = torch.stack(parts)
            continue
        rel = to_release(name)
        assert rel is not None, name
        if name.endswith(FP32_SUFFIXES) and v.is_floating_point():
            tensors[rel] = v.float().contiguous()
            stored[name] = v.float()
        else:
            stored[name] = put(rel, v, name.endswith(FP8_SUFFIXES))
    if mtp:  # an MTP layer the model does not use: must be listed and skipped
        tensors["mtp.0.norm.weight"] = torch.ones(model.config.hidden_size)
    save_file(tensors, path / "model.safetensors")
    cfg = release_config(model, quantized=bool(fp8), fp4_experts=fp4_experts)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    return stored


def oracle_with(model, weights: dict[str, torch.Tensor]) -> DeepseekV4ForCausalLM:
    """A copy of `model` whose weights are replaced by `weights` (canonical names)."""
    clone = _eager(DeepseekV4ForCausalLM(model.config))
    clone.load_state_dict(model.state_dict())
    sd = {("" if k == "lm_head.weight" else "model.") + k: v for k, v in weights.items()}
    missing, unexpected = clone.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all("rotary_emb" in k for k in missing), missing
    return clone

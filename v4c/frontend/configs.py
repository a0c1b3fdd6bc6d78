"""Read a checkpoint's `config.json` into `ModelConfig`.

Two dialects:
- Hugging Face (`DeepseekV4Config`): `hidden_size`, `layer_types`, `compress_rates`,
  `mlp_layer_types`, nested `rope_parameters`, plus the legacy keys DeepSeek's hub configs ship
  (`compress_ratios`, `num_hash_layers`, `qk_rope_head_dim`, `rope_scaling`).
- DeepSeek's release `inference/config.json` (`ModelArgs`): `dim`, `n_layers`, `n_heads`,
  `compress_ratios`, `n_hash_layers`, `score_func`, `route_scale`, `window_size`, YaRN as
  `original_seq_len` / `rope_factor` / `beta_fast` / `beta_slow`, `expert_dtype`, `scale_fmt`.
Layer kinds follow DeepSeek: compress ratio 0 = sliding only, 4 = CSA (overlapping windows and
a Lightning Indexer), any other positive ratio = HCA at that ratio.
"""

from v4c.runtime.config import ConfigError, ModelConfig, RopeConfig

HF_LAYER_TYPES = {"sliding_attention": "sliding", "compressed_sparse_attention": "csa",
                  "heavily_compressed_attention": "hca"}
HF_MLP_TYPES = {"hash_moe": "hash", "moe": "topk"}
CSA_RATIO = 4
YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate",
             "attention_factor", "mscale", "mscale_all_dim")


def is_release_dialect(raw: dict) -> bool:
    return "dim" in raw and "n_layers" in raw


def read_config(raw: dict) -> ModelConfig:
    """Normalise either dialect; raises ConfigError naming the key and the fix."""
    try:
        return _from_release(raw) if is_release_dialect(raw) else _from_hf(raw)
    except KeyError as e:
        raise ConfigError(f"config.json lacks required key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config.json has a value of the wrong type: {e}") from None


def _kinds_from_ratios(ratios, n: int, csa_ratio: int = CSA_RATIO) -> tuple[tuple, tuple]:
    if len(ratios) < n:
        raise ConfigError(f"compress_ratios lists {len(ratios)} layers, fewer than the {n} layers of the model")
    ratios = [int(r) for r in ratios[:n]]  # trailing entries describe MTP layers
    kinds = tuple("sliding" if r == 0 else "csa" if r == csa_ratio else "hca" for r in ratios)
    return kinds, tuple(ratios)


def _eos(value) -> tuple:
    return () if value is None else tuple(value) if isinstance(value, list) else (int(value),)


def _limit(value) -> float | None:
    return float(value) if value and float(value) > 0 else None  # DeepSeek: limit 0 = no clamp


def _yarn(d: dict | None, default_attention_factor) -> dict | None:
    if not d or d.get("rope_type", d.get("type", "default")) != "yarn":
        return None
    yarn = {k: d[k] for k in YARN_KEYS if d.get(k) is not None}
    yarn.setdefault("attention_factor", default_attention_factor)
    return yarn


def _hf_rope(raw: dict) -> tuple[RopeConfig, RopeConfig]:
    rp = raw.get("rope_parameters") or {}
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main, comp = rp["main"], rp["compress"]
        return (RopeConfig(float(main.get("rope_theta", raw.get("rope_theta", 10000.0))), _yarn(main, None)),
                RopeConfig(float(comp.get("rope_theta", raw.get("compress_rope_theta", 160000.0))), _yarn(comp, 1.0)))
    flat = {**(raw.get("rope_scaling") or {}), **{k: v for k, v in rp.items() if k not in ("main", "compress")}}
    # V4 applies YaRN to the compressed branches only, without YaRN's attention factor.
    return (RopeConfig(float(raw.get("rope_theta", 10000.0))),
            RopeConfig(float(raw.get("compress_rope_theta", 160000.0)), _yarn(flat, 1.0)))


def _from_hf(raw: dict) -> ModelConfig:
    if raw.get("model_type", "deepseek_v4") != "deepseek_v4":
        raise ConfigError(f"model_type is {raw['model_type']!r}; v4c compiles DeepSeek-V4 models (deepseek_v4)")
    if raw.get("num_key_value_heads", 1) != 1:
        raise ConfigError(f"num_key_value_heads = {raw['num_key_value_heads']}; V4 attention shares one KV head")
    n = raw.get("num_hidden_layers", 43)
    head_dim = raw.get("head_dim", 512)
    if raw.get("qk_rope_head_dim") is not None:
        rope_dim = raw["qk_rope_head_dim"]
    else:
        rope_dim = int(head_dim * (raw.get("partial_rotary_factor") or 64 / 512))
    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128, **(raw.get("compress_rates") or {})}
    rates["compressed_sparse_attention"] = raw.get("compress_rate_csa") or rates["compressed_sparse_attention"]
    rates["heavily_compressed_attention"] = raw.get("compress_rate_hca") or rates["heavily_compressed_attention"]
    if raw.get("layer_types"):
        unknown = sorted(set(raw["layer_types"]) - set(HF_LAYER_TYPES))
        if unknown:
            raise ConfigError(f"layer_types contains {unknown}; allowed: {', '.join(HF_LAYER_TYPES)}")
        names = list(raw["layer_types"])[:n]
        attention = tuple(HF_LAYER_TYPES[t] for t in names)
        compress = tuple(rates.get(t, 0) if t != "sliding_attention" else 0 for t in names)
    elif raw.get("compress_ratios"):
        attention, compress = _kinds_from_ratios(raw["compress_ratios"], n, rates["compressed_sparse_attention"])
    else:  # transformers' default schedule: two HCA layers, then CSA / HCA interleaved
        names = ["heavily_compressed_attention"] * min(n, 2) + [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(max(n - 2, 0))]
        attention = tuple(HF_LAYER_TYPES[t] for t in names)
        compress = tuple(rates[t] for t in names)
    if raw.get("mlp_layer_types"):
        unknown = sorted(set(raw["mlp_layer_types"]) - set(HF_MLP_TYPES))
        if unknown:
            raise ConfigError(f"mlp_layer_types contains {unknown}; allowed: {', '.join(HF_MLP_TYPES)}")
        mlp = tuple(HF_MLP_TYPES[t] for t in list(raw["mlp_layer_types"])[:n])
    else:
        n_hash = raw.get("num_hash_layers", raw.get("n_hash_layers", 3))
        mlp = ("hash",) * min(n, n_hash) + ("topk",) * max(0, n - n_hash)
    rope_main, rope_compress = _hf_rope(raw)
    moe_inter = raw.get("moe_intermediate_size", 2048)
    return ModelConfig(
        vocab_size=raw.get("vocab_size", 129280), hidden_size=raw.get("hidden_size", 4096), num_layers=n,
        num_heads=raw.get("num_attention_heads", 64), head_dim=head_dim, rope_head_dim=rope_dim,
        q_lora_rank=raw.get("q_lora_rank", 1024), o_groups=raw.get("o_groups", 8),
        o_lora_rank=raw.get("o_lora_rank", 1024), sliding_window=raw.get("sliding_window", 128),
        attention=attention, compress_rates=compress,
        index_n_heads=raw.get("index_n_heads", 64), index_head_dim=raw.get("index_head_dim", 128),
        index_topk=raw.get("index_topk", 512), mlp=mlp,
        n_routed_experts=raw.get("n_routed_experts", 256),
        shared_intermediate_size=moe_inter,  # transformers builds one shared expert of the expert width
        num_experts_per_tok=raw.get("num_experts_per_tok", 6), moe_intermediate_size=moe_inter,
        scoring_func=raw.get("scoring_func", raw.get("score_func", "sqrtsoftplus")),
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.5)),
        swiglu_limit=_limit(raw.get("swiglu_limit", 10.0)),
        hc_mult=raw.get("hc_mult", 4), hc_sinkhorn_iters=raw.get("hc_sinkhorn_iters", 20),
        hc_eps=float(raw.get("hc_eps", 1e-6)), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_main=rope_main, rope_compress=rope_compress,
        max_position_embeddings=raw.get("max_position_embeddings", 1 << 20),
        bos_token_id=raw.get("bos_token_id", 0), eos_token_ids=_eos(raw.get("eos_token_id", 1)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        extras=_extras(raw, ("expert_dtype",)))  # HF's own "dtype" is torch's, not a source format


def _extras(raw: dict, keys: tuple[str, ...]) -> dict:
    """Informative source facts: the quantization config, and the dialect's own dtype keys."""
    q = raw.get("quantization_config") or {}
    out = {k: q[k] for k in ("quant_method", "fmt", "scale_fmt", "weight_block_size", "expert_dtype") if k in q}
    out.update({k: raw[k] for k in keys if raw.get(k) is not None})
    return out


RELEASE_REQUIRED = ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "rope_head_dim", "q_lora_rank",
                    "o_groups", "o_lora_rank", "window_size", "n_routed_experts", "n_activated_experts",
                    "moe_inter_dim")


def _from_release(raw: dict) -> ModelConfig:
    missing = [k for k in RELEASE_REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"config.json (DeepSeek release dialect) lacks required keys {missing}")
    n = raw["n_layers"]
    attention, compress = _kinds_from_ratios(raw.get("compress_ratios") or [0] * n, n)
    n_hash = raw.get("n_hash_layers", 0)
    yarn = None
    if raw.get("original_seq_len", 0) > 0:
        yarn = {"factor": float(raw["rope_factor"]), "original_max_position_embeddings": raw["original_seq_len"],
                "beta_fast": raw.get("beta_fast", 32), "beta_slow": raw.get("beta_slow", 1), "attention_factor": 1.0}
    moe_inter = raw["moe_inter_dim"]
    return ModelConfig(
        vocab_size=raw["vocab_size"], hidden_size=raw["dim"], num_layers=n, num_heads=raw["n_heads"],
        head_dim=raw["head_dim"], rope_head_dim=raw["rope_head_dim"], q_lora_rank=raw["q_lora_rank"],
        o_groups=raw["o_groups"], o_lora_rank=raw["o_lora_rank"], sliding_window=raw["window_size"],
        attention=attention, compress_rates=compress,
        index_n_heads=raw.get("index_n_heads", 64), index_head_dim=raw.get("index_head_dim", 128),
        index_topk=raw.get("index_topk", 512),
        mlp=("hash",) * min(n, n_hash) + ("topk",) * max(0, n - n_hash),
        n_routed_experts=raw["n_routed_experts"],
        shared_intermediate_size=raw.get("n_shared_experts", 1) * moe_inter,
        num_experts_per_tok=raw["n_activated_experts"], moe_intermediate_size=moe_inter,
        scoring_func=raw.get("score_func", "sqrtsoftplus"), routed_scaling_factor=float(raw.get("route_scale", 1.0)),
        swiglu_limit=_limit(raw.get("swiglu_limit", 0.0)),
        hc_mult=raw.get("hc_mult", 4), hc_sinkhorn_iters=raw.get("hc_sinkhorn_iters", 20),
        hc_eps=float(raw.get("hc_eps", 1e-6)), rms_norm_eps=float(raw.get("norm_eps", 1e-6)),
        rope_main=RopeConfig(float(raw.get("rope_theta", 10000.0))),
        rope_compress=RopeConfig(float(raw.get("compress_rope_theta", 160000.0)), yarn),
        max_position_embeddings=raw.get("max_seq_len", 1 << 20),
        bos_token_id=raw.get("bos_token_id", 0), eos_token_ids=_eos(raw.get("eos_token_id", 1)),
        extras=_extras(raw, ("dtype", "scale_fmt", "scale_dtype", "expert_dtype")))

"""`ModelConfig`: the one description of a V4-family model that v4c's compiler and runtime share.

Checkpoint dialects (Hugging Face `config.json`, DeepSeek's release `config.json`) are normalised
into this by `v4c.frontend.configs`; artifacts store it in `manifest.json` via `to_dict`.
"""

from dataclasses import asdict, dataclass, field, fields

ATTENTION_KINDS = ("sliding", "csa", "hca")
MLP_KINDS = ("hash", "topk")
SCORE_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field, the value and what is allowed."""


@dataclass(frozen=True)
class RopeConfig:
    """One RoPE family. `yarn` holds YaRN parameters (factor, original_max_position_embeddings,
    beta_fast, beta_slow, truncate, attention_factor) or is None for plain RoPE."""

    theta: float
    yarn: dict | None = None


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    rope_head_dim: int  # trailing channels of each head that carry RoPE
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    attention: tuple[str, ...]  # per layer: sliding | csa | hca
    compress_rates: tuple[int, ...]  # per layer: 0 for sliding, else tokens pooled per entry
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    mlp: tuple[str, ...]  # per layer: hash | topk
    n_routed_experts: int
    shared_intermediate_size: int  # the shared expert's SwiGLU width (n_shared_experts * expert width)
    num_experts_per_tok: int
    moe_intermediate_size: int
    scoring_func: str
    routed_scaling_factor: float
    swiglu_limit: float | None  # None: no clamp
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    rms_norm_eps: float
    rope_main: RopeConfig  # sliding layers
    rope_compress: RopeConfig  # CSA / HCA layers, their compressors and the indexer
    max_position_embeddings: int = 1 << 20
    bos_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = (1,)
    tie_word_embeddings: bool = False
    extras: dict = field(default_factory=dict)  # informative only (e.g. source quantization)

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "q_lora_rank",
                    "o_groups", "o_lora_rank", "sliding_window", "n_routed_experts", "shared_intermediate_size",
                    "num_experts_per_tok", "moe_intermediate_size", "hc_mult", "hc_sinkhorn_iters")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} = {value!r}: must be a positive integer")
        n = self.num_layers
        for name, allowed in (("attention", ATTENTION_KINDS), ("mlp", MLP_KINDS)):
            kinds = getattr(self, name)
            if len(kinds) != n:
                raise ConfigError(f"{name} lists {len(kinds)} layers but num_layers = {n}; give one entry per layer")
            bad = sorted({k for k in kinds if k not in allowed})
            if bad:
                raise ConfigError(f"{name} contains {bad}; allowed: {', '.join(allowed)}")
        if len(self.compress_rates) != n:
            raise ConfigError(f"compress_rates lists {len(self.compress_rates)} layers but num_layers = {n}")
        for i, (kind, rate) in enumerate(zip(self.attention, self.compress_rates)):
            if (kind == "sliding") != (rate == 0) or rate < 0:
                raise ConfigError(f"layer {i}: attention {kind!r} with compress rate {rate}; "
                                  "sliding layers use rate 0, csa/hca layers a positive rate")
        if self.head_dim % 2 or self.rope_head_dim % 2 or not 0 < self.rope_head_dim <= self.head_dim:
            raise ConfigError(f"rope_head_dim = {self.rope_head_dim}, head_dim = {self.head_dim}: "
                              "both must be even and 0 < rope_head_dim <= head_dim")
        if (self.num_heads * self.head_dim) % self.o_groups:
            raise ConfigError(f"o_groups = {self.o_groups} must divide num_heads * head_dim = "
                              f"{self.num_heads * self.head_dim}")
        if "csa" in self.attention:
            for name in ("index_n_heads", "index_head_dim", "index_topk"):
                if getattr(self, name) < 1:
                    raise ConfigError(f"{name} = {getattr(self, name)}: CSA layers need a positive value")
            if self.index_head_dim % 2 or self.index_head_dim < self.rope_head_dim:
                raise ConfigError(f"index_head_dim = {self.index_head_dim} must be even and >= rope_head_dim "
                                  f"= {self.rope_head_dim}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"num_experts_per_tok = {self.num_experts_per_tok} exceeds n_routed_experts = "
                              f"{self.n_routed_experts}")
        if self.scoring_func not in SCORE_FUNCS:
            raise ConfigError(f"scoring_func = {self.scoring_func!r}; allowed: {', '.join(SCORE_FUNCS)}")

    # layers -------------------------------------------------------------------------------------
    def rope_family(self, layer: int) -> str:
        """`main` for sliding layers, `compress` for CSA / HCA layers (as in the reference model)."""
        return "main" if self.attention[layer] == "sliding" else "compress"

    # serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("attention", "compress_rates", "mlp", "eos_token_ids"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; this v4c knows {sorted(known)}")
        d = dict(d)
        for key in ("attention", "compress_rates", "mlp", "eos_token_ids"):
            if key in d:
                d[key] = tuple(d[key])
        for key in ("rope_main", "rope_compress"):
            if isinstance(d.get(key), dict):
                d[key] = RopeConfig(**d[key])
        return cls(**d)

"""config.json dialects -> ModelConfig, RoPE frequencies, and config errors."""

import json

import pytest
import torch

from v4c.frontend import CheckpointError, import_checkpoint
from v4c.frontend.configs import read_config
from v4c.frontend.rope import inv_freq
from v4c.runtime.config import ConfigError

RATIO = {"sliding_attention": 0, "compressed_sparse_attention": 4}


def _saved_config(path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_hub_legacy_keys_read_like_the_modern_config(hf_checkpoints):
    """DeepSeek's hub config.json spells the schedule as compress_ratios (+ an MTP entry),
    num_hash_layers, qk_rope_head_dim and a flat rope_scaling."""
    modern = _saved_config(hf_checkpoints["hc2_yarn"])
    hca = modern["compress_rates"]["heavily_compressed_attention"]
    legacy = {k: v for k, v in modern.items() if k not in ("layer_types", "mlp_layer_types", "rope_parameters",
                                                           "compress_rates", "partial_rotary_factor")}
    legacy.update(compress_ratios=[RATIO.get(t, hca) for t in modern["layer_types"]] + [0],
                  num_hash_layers=modern["mlp_layer_types"].count("hash_moe"),
                  qk_rope_head_dim=modern["qk_rope_head_dim"],
                  rope_scaling={k: v for k, v in modern["rope_parameters"]["compress"].items()
                                if k not in ("rope_theta", "partial_rotary_factor", "attention_factor")}
                  | {"type": "yarn"})
    del legacy["rope_scaling"]["rope_type"]
    assert read_config(legacy) == read_config(modern)


@pytest.mark.parametrize("name", ["hc1_topk_small", "hc2_yarn"])
def test_rope_frequencies_equal_transformers(name, oracle_models):
    model = oracle_models[name]
    cfg = read_config(model.config.to_dict())
    for family, rc in (("main", cfg.rope_main), ("compress", cfg.rope_compress)):
        ours, scale = inv_freq(rc, cfg.rope_head_dim, cfg.max_position_embeddings)
        theirs = getattr(model.model.rotary_emb, f"{family}_inv_freq")
        assert torch.equal(ours, theirs), family
        assert scale == getattr(model.model.rotary_emb, f"{family}_attention_scaling")
    assert (cfg.rope_compress.yarn is not None) == (name == "hc2_yarn")


def test_release_dialect_schedule():
    raw = dict(vocab_size=10, dim=16, moe_inter_dim=8, n_layers=4, n_hash_layers=1, n_heads=2, n_routed_experts=4,
               n_shared_experts=2, n_activated_experts=2, q_lora_rank=8, head_dim=8, rope_head_dim=4, o_groups=2,
               o_lora_rank=4, window_size=4, compress_ratios=[0, 4, 128, 64, 0], original_seq_len=65536,
               rope_factor=16, route_scale=1.5, swiglu_limit=0.0, index_topk=2, index_n_heads=2, index_head_dim=4)
    cfg = read_config(raw)
    assert cfg.attention == ("sliding", "csa", "hca", "hca") and cfg.compress_rates == (0, 4, 128, 64)
    assert cfg.mlp == ("hash", "topk", "topk", "topk")
    assert cfg.shared_intermediate_size == 16  # DeepSeek: n_shared_experts x moe_inter_dim
    assert cfg.swiglu_limit is None  # DeepSeek: limit 0 means no clamp
    assert cfg.rope_compress.yarn["factor"] == 16 and cfg.rope_main.yarn is None


@pytest.mark.parametrize("edit, message", [
    (dict(num_key_value_heads=2), "num_key_value_heads = 2; V4 attention shares one KV head"),
    (dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"]), "layer_types contains ['full_attention']"),
    (dict(mlp_layer_types=["moe"]), "mlp lists 1 layers but num_layers = 3"),
    (dict(model_type="llama"), "model_type is 'llama'"),
    (dict(num_hidden_layers=0), "num_layers = 0: must be a positive integer"),
    (dict(o_groups=5), "o_groups = 5 must divide num_heads * head_dim = 128"),
])
def test_bad_hf_config_is_named(edit, message, hf_checkpoints):
    raw = _saved_config(hf_checkpoints["hc2_yarn"]) | edit
    with pytest.raises(ConfigError) as e:
        read_config(raw)
    assert message in str(e.value)


def test_release_config_missing_key_is_named():
    with pytest.raises(ConfigError, match=r"lacks required keys \['n_heads', 'head_dim', 'rope_head_dim', 'q_lora_rank'"):
        read_config({"dim": 16, "n_layers": 2, "vocab_size": 10})


def test_config_errors_reach_the_user_with_the_path(tmp_path, hf_checkpoints):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in hf_checkpoints["hc2_yarn"].iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        import_checkpoint(ckpt, max_context=16)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        import_checkpoint(ckpt, max_context=16)

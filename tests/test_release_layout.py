"""DeepSeek's release layout: names, config dialect, FP8 / FP4 weights, unused and bad tensors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV4ForCausalLM

from conftest import rel_err, tokens
from oracle import canonical_state, oracle_with, save_release
from v4c.frontend import CheckpointError, import_checkpoint
from v4c.interpret import interpret
from v4c.ir import load_weight, print_module

NAME = "hc2_yarn"  # CSA (indexer), HCA and sliding layers; hash then top-k MoE; YaRN
BOUND = 1e-4


def _import(path):
    return import_checkpoint(path, max_context=256)


def test_transformers_loads_our_release_names(tmp_path, oracle_models):
    """The name table agrees with transformers' conversion_mapping["deepseek_v4"]: its loader maps
    every tensor we write in the release layout onto the right parameter."""
    model = oracle_models[NAME]
    save_release(model, tmp_path)
    loaded = DeepseekV4ForCausalLM.from_pretrained(tmp_path, config=model.config)
    expected, got = model.state_dict(), loaded.state_dict()
    for key, value in expected.items():
        if "rotary_emb" not in key:
            assert torch.equal(got[key], value), key


def test_both_layouts_give_the_same_ir_and_tensors(tmp_path, oracle_models, hf_checkpoints):
    hf_module, hf_ckpt = _import(hf_checkpoints[NAME])
    save_release(oracle_models[NAME], tmp_path / "ckpt")
    rel_module, rel_ckpt = _import(tmp_path / "ckpt")
    assert (hf_ckpt.layout, rel_ckpt.layout) == ("hf", "release")
    assert print_module(hf_module) == print_module(rel_module)
    for name in hf_module.params:
        assert torch.equal(load_weight(hf_module.weights[name]), load_weight(rel_module.weights[name])), name


QUANT = {
    "fp8_128x128_fp32": dict(fp8="fp32", block=(128, 128)),
    "fp8_128x128_ue8m0": dict(fp8="ue8m0", block=(128, 128)),
    "fp8_1x32_ue8m0": dict(fp8="ue8m0", block=(1, 32)),
    "fp8_1x32_fp32_fp4_experts": dict(fp8="fp32", block=(1, 32), fp4_experts=True),
    "deepseek_bf16_fp8_fp4": dict(dtype=torch.bfloat16, fp8="ue8m0", block=(128, 128), fp4_experts=True),
}


@pytest.mark.parametrize("variant", QUANT)
def test_quantized_release_matches_oracle_on_dequantized_weights(variant, tmp_path, oracle_models):
    """FP8 / FP4 checkpoints: v4c dequantizes (ceil-div scale grids, partial blocks included) and
    the result matches the oracle run on the same dequantized values."""
    model = oracle_models[NAME]
    stored = save_release(model, tmp_path, **QUANT[variant])
    module, ckpt = _import(tmp_path)
    assert ckpt.unused == {"mtp.0.norm.weight": "multi-token prediction (MTP) layers"}
    for name, value in stored.items():
        assert torch.equal(load_weight(module.weights[name]).float(), value.float()), name
    ids = tokens(1, 96, seed=4)
    with torch.no_grad():
        ref = oracle_with(model, stored)(ids).logits
    assert rel_err(interpret(module).forward(ids), ref) <= BOUND
    # quantization really changed the weights: this is not the unquantized model
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) > 1e-4


def test_fp8_block_shape_comes_from_quantization_config(tmp_path, oracle_models):
    """A 1x128 grid is indistinguishable from 128x128 on small tensors; the config decides."""
    model = oracle_models[NAME]
    stored = save_release(model, tmp_path, fp8="fp32", block=(1, 128))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [1, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    module, _ = _import(tmp_path)
    name = "layers.0.self_attn.q_b_proj.weight"
    assert torch.equal(load_weight(module.weights[name]), stored[name])


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor_is_named_with_its_expected_shape(tmp_path, oracle_models):
    save_release(oracle_models[NAME], tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("layers.1.attn.wo_b.weight"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.wo_b\.weight.*expected shape \[48, 24\]"):
        _import(tmp_path)


def test_misshaped_tensor_is_named(tmp_path, oracle_models):
    save_release(oracle_models[NAME], tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"layers.0.attn.wq_a.weight": torch.zeros(24, 47)}))
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.wq_a\.weight has shape \[24, 47\].*\[24, 48\]"):
        _import(tmp_path)


def test_missing_expert_is_named(tmp_path, oracle_models):
    save_release(oracle_models[NAME], tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("layers.2.ffn.experts.3.w3.weight"))
    with pytest.raises(CheckpointError, match=r"layers\.2\.ffn\.experts\.3\.w3\.weight"):
        _import(tmp_path)


def test_unknown_tensor_is_an_error(tmp_path, oracle_models):
    save_release(oracle_models[NAME], tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"layers.0.attn.mystery.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"neither used by the model nor known to be unused.*mystery"):
        _import(tmp_path)


def test_fp8_weight_without_scale_is_an_error(tmp_path, oracle_models):
    save_release(oracle_models[NAME], tmp_path, fp8="fp32")
    _rewrite(tmp_path, lambda t: t.pop("layers.0.attn.wq_b.scale"))
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.wq_b\.weight is FP8 e4m3 but has no block scale"):
        _import(tmp_path)


def test_canonical_names_cover_every_oracle_parameter(oracle_models, hf_checkpoints):
    module, _ = _import(hf_checkpoints[NAME])
    ours = {n for n in module.params if not n.startswith("rope.")}
    assert ours == set(canonical_state(oracle_models[NAME]))

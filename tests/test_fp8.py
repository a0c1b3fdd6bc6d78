"""FP8 compilation: formats, the real-storage kernels against the fake-quant path, calibration,
the report, drift gates and `report diff`."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import rel_err, tokens
from oracle import save_hf
from v4c.cli import main
from v4c.frontend import import_checkpoint
from v4c.interpret import interpret
from v4c.ir import verify
from v4c.passes import PASSES
from v4c.pipeline import run_pipeline
from v4c.runtime.artifact import open_artifact
from v4c.runtime.kernels.quantized import linear_fp8, moe_experts_q
from v4c.runtime.quant import (decode_entries, dequant_fp4, dequant_fp8, encode_entries, entry_layout,
                               fake_quant_groups, quant_fp4, quant_fp8)
from v4c.spec import PassSpec

NAME = "hc2_yarn"
g = torch.Generator().manual_seed(0)


# --- formats ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [128, 32, 7])
@pytest.mark.parametrize("fmt", ["fp32", "ue8m0"])
def test_dynamic_activation_quant_against_ml_dtypes(group, fmt):
    x = torch.randn(5, 3, 100, generator=g) * 4
    ours = fake_quant_groups(x, group, fmt)
    xs = torch.nn.functional.pad(x, (0, -100 % group)).view(5, 3, -1, group)
    amax = xs.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    scale = torch.exp2(torch.ceil(torch.log2((amax / 448).double()))).float() if fmt == "ue8m0" else amax / 448
    codes = (xs / scale).numpy().astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    expected = (torch.from_numpy(codes) * scale).view(5, 3, -1)[..., :100]
    assert torch.equal(ours, expected)


def test_kv_entries_in_deepseeks_split_layout():
    assert entry_layout("fp8_split", 512, 64) == ("u8", 584)  # DeepSeek's FP8 entry: 448 + 2*64 + 7 (+1 pad)
    x = torch.randn(2, 9, 80, generator=g) * 3
    stored = encode_entries(x, "fp8_split", 16)
    assert stored.dtype == torch.uint8 and stored.shape[-1] == entry_layout("fp8_split", 80, 16)[1]
    back = decode_entries(stored, "fp8_split", 80, 16)
    assert torch.equal(back[..., 64:], x[..., 64:].to(torch.bfloat16).float())  # RoPE channels: exact bf16
    scale = stored[..., 96:97].view(torch.float8_e8m0fnu).float()  # one UE8M0 scale per 64 non-RoPE values
    expected = (x[..., :64] / scale).numpy().astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale.numpy()
    assert np.array_equal(back[..., :64].numpy(), expected)


# --- kernels against the fake-quant reference --------------------------------------------------------
def test_fp8_linear_against_its_fake_quant_reference():
    x, w = torch.randn(2, 7, 96, generator=g), torch.randn(50, 96, generator=g)
    q, s = quant_fp8(w, (128, 128), "ue8m0")
    act = {"mode": "dynamic", "group": 32, "scale_format": "ue8m0"}
    ours = linear_fp8(x, q, s, block=[128, 128], act=act)
    reference = fake_quant_groups(x, 32, "ue8m0") @ dequant_fp8(q, s, (128, 128)).T
    assert torch.allclose(ours, reference, rtol=1e-6, atol=1e-6)
    assert rel_err(ours, x @ w.T) < 0.1  # and it is still the same layer


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_quantized_experts_against_their_fake_quant_reference(fmt):
    e, d, inter = 4, 64, 32
    x, gu, dn = torch.randn(1, 9, d, generator=g), torch.randn(e, 2 * inter, d, generator=g), torch.randn(e, d, inter, generator=g)
    idx = torch.randint(0, e, (1, 9, 2), generator=g)
    weights = torch.rand(1, 9, 2, generator=g)
    quant = (lambda w: quant_fp4(w)) if fmt == "fp4" else (lambda w: quant_fp8(w, (128, 128), "fp32"))
    deq = (lambda q, s: dequant_fp4(q, s)) if fmt == "fp4" else (lambda q, s: dequant_fp8(q, s, (128, 128)))
    qg, sg = zip(*[quant(m) for m in gu])
    qd, sd = zip(*[quant(m) for m in dn])
    act = {"mode": "dynamic", "group": 64, "scale_format": "fp32"}
    ours = moe_experts_q(x, weights, idx, torch.stack(qg), torch.stack(sg), torch.stack(qd), torch.stack(sd),
                         format=fmt, block=[128, 128], down_block=[128, 128], act_in=act, act_mid=act)
    from v4c.runtime.kernels.moe import moe_experts
    reference = moe_experts(x, weights, idx, torch.stack([deq(q, s) for q, s in zip(qg, sg)]),
                            torch.stack([deq(q, s) for q, s in zip(qd, sd)]), act_in=act, act_mid=act)
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-5)


# --- compiling ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calib_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.jsonl"
    docs = [json.dumps({"token_ids": tokens(1, 300, seed=100 + i)[0].tolist()}) for i in range(6)]
    path.write_text("\n".join(docs) + "\n")
    return path


def _pipeline(module, **fp8):
    return run_pipeline(module, [PassSpec(name="fp8", options=fp8)])


def test_real_fp8_storage_matches_the_fake_quant_path(hf_checkpoints):
    module = import_checkpoint(hf_checkpoints[NAME], max_context=256)[0]
    for experts in ("fp8", "fp4"):
        real = _pipeline(module, experts=experts, weights={"block": [1, 32], "scale_format": "fp32"})
        fake = _pipeline(module, experts=experts, weights={"block": [1, 32], "scale_format": "fp32"}, fake_quant=True)
        verify(real)
        quantized = {n: t.dtype for n, t in real.params.items() if n.endswith(("q_a_proj.weight", "gate_up_proj"))}
        assert set(quantized.values()) == {"f8e4m3", "i8" if experts == "fp4" else "f8e4m3"}
        ids = tokens(1, 80, seed=7)
        out_real, out_fake = interpret(real).forward(ids), interpret(fake).forward(ids)
        assert rel_err(out_real, out_fake) < 1e-5
        plain = interpret(module).forward(ids)  # quantized, but the same model
        assert torch.nn.functional.cosine_similarity(out_real.flatten(), plain.flatten(), dim=0) > 0.9


def test_skipped_matrices_can_be_stored_in_bf16(hf_checkpoints):
    module = import_checkpoint(hf_checkpoints[NAME], max_context=256)[0]
    keep, bf16 = _pipeline(module), _pipeline(module, skipped_dtype="bf16")
    skipped = bf16.stats["fp8"]["skipped"]
    assert "lm_head.weight" in skipped and any("compressor.kv_proj" in n for n in skipped)
    assert all(bf16.params[n].dtype == "bf16" for n in skipped if keep.params[n].dtype == "f32")
    assert keep.params["lm_head.weight"].dtype == "f32"
    stored = bf16.weights["lm_head.weight"].load()
    assert stored.dtype == torch.bfloat16
    ids = tokens(1, 48, seed=5)
    out_keep, out_bf16 = interpret(keep).forward(ids), interpret(bf16).forward(ids)
    assert not torch.equal(out_bf16, out_keep)  # the same model, those weights rounded to bf16
    assert torch.nn.functional.cosine_similarity(out_bf16.flatten(), out_keep.flatten(), dim=0) > 0.95


def test_kv_state_is_stored_in_fp8(hf_checkpoints):
    module = _pipeline(import_checkpoint(hf_checkpoints[NAME], max_context=256)[0])
    entries = {n: t for n, t in module.states.items() if n.endswith("compressor.entries")}
    assert entries and all(t.dtype == "u8" and t.shape[2] == entry_layout("fp8_split", 32, 8)[1]
                           for t in entries.values())
    ring = module.states["layers.0.self_attn.ring"]  # the sliding window too, in the same layout
    assert ring.dtype == "u8" and ring.shape[2] == entry_layout("fp8_split", 32, 8)[1]
    keys = module.states["layers.0.self_attn.compressor.indexer.entries"]  # indexer keys: e4m3 + fp32 scale
    assert keys.dtype == "u8" and keys.shape[2] == entry_layout("fp8_block", 16, 0)[1] == 16 + 4
    session = interpret(module)
    session.forward(tokens(1, 64, seed=3))
    assert session.state["layers.0.self_attn.compressor.entries"].dtype == torch.uint8


def test_static_activations_need_calibration(hf_checkpoints):
    module = import_checkpoint(hf_checkpoints[NAME], max_context=256)[0]
    with pytest.raises(ValueError, match="static activations need calibration statistics"):
        _pipeline(module, activations={"mode": "static"})


def _yaml(root, ckpt, data, fp8=None, thresholds=None, **calibration):
    lines = [f"model:\n  checkpoint: {ckpt}", "kv:\n  max_context: 256\n  prefill_chunk: 128"]
    if fp8 is not None:
        lines.append("passes:\n  - fp8: " + json.dumps(fp8))
    cal = {"data": str(data), "samples": 8, "seq_len": 64, "heldout_samples": 2, "heldout_seq_len": 128, **calibration}
    lines.append("calibration: " + json.dumps(cal))
    if thresholds:
        lines.append("report:\n  thresholds: " + json.dumps(thresholds))
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.yaml").write_text("\n".join(lines) + "\n")
    return root / "model.yaml"


@pytest.fixture(scope="module")
def fp8_build(tmp_path_factory, hf_checkpoints, calib_data):
    root = tmp_path_factory.mktemp("fp8")
    spec = _yaml(root, hf_checkpoints[NAME], calib_data, {"experts": "fp4", "activations": {"mode": "static"}},
                 {"max_kl": 1.0, "min_top1": 0.3})
    result = CliRunner().invoke(main, ["compile", str(spec), "-o", str(root / "art")])
    assert result.exit_code == 0, result.output
    return root / "art"


def test_calibration_statistics(fp8_build, hf_checkpoints):
    report = json.loads((fp8_build / "report" / "calibration.json").read_text())
    acts = report["activations"]
    assert "layers.0.self_attn.q_a_proj.weight" in acts and "layers.1.mlp.experts.down_proj" in acts
    a = acts["layers.0.self_attn.q_a_proj.weight"]
    assert a["min"] <= -a["p99"] < 0 < a["p99"] <= a["amax"] == max(-a["min"], a["max"])
    assert a["mse_scale"] <= a["amax_scale"] and sum(a["hist"]["counts"]) > 0
    for e in report["experts"].values():  # every token routed to k = 2 experts
        assert sum(e["counts"]) == 2 * 8 * 64
    assert report["calibration"]["tokens"] == 8 * 64
    assert set(report["layers"]) >= {"0", "1", "2"}


def test_a_triton_build_reports_on_the_checkpoints_weights(tmp_path, hf_checkpoints, calib_data):
    """The triton lowering joins sibling projections (their weights concatenated in the artifact); the calibration
    report is taken on the module before that rewrite, so it names and measures the checkpoint's weights."""
    spec = _yaml(tmp_path, hf_checkpoints[NAME], calib_data, {"activations": {"mode": "dynamic", "group": 16}},
                 {"max_kl": 1.0, "min_top1": 0.3}, samples=2, heldout_samples=1)
    spec.write_text(spec.read_text().replace("calibration:", "  - fuse\ncalibration:") + "target: triton\n")
    result = CliRunner().invoke(main, ["compile", str(spec), "-o", str(tmp_path / "art")])
    assert result.exit_code == 0, result.output
    art = open_artifact(tmp_path / "art")
    assert art.manifest["target"]["kernels"]["joined_siblings"]["launches"] > 0
    assert any("+" in name for name in art.weights())  # joined weights stored
    report = json.loads((tmp_path / "art" / "report" / "calibration.json").read_text())
    assert {"layers.0.self_attn.q_a_proj.weight", "layers.0.self_attn.kv_proj.weight"} <= set(report["weights"])
    assert not any("+" in name for name in [*report["weights"], *report["activations"]])


def test_report_files_and_manifest(fp8_build):
    art = open_artifact(fp8_build)
    m = art.manifest
    assert {"report/calibration.json", "report/index.html"} <= set(m["files"])  # hashed like everything else
    assert m["report"]["gates_passed"] is True and 0 <= m["report"]["top1"] <= 1
    page = (fp8_build / "report" / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "") and "<script" not in page  # self-contained
    info = json.loads(CliRunner().invoke(main, ["inspect", str(fp8_build), "--json"]).output)
    assert info["weights"]["by_dtype"]["i8"] > 0 and "f8e4m3" in info["weights"]["by_dtype"]
    assert info["kv"]["families"]["CSA entries"]["bytes_per_token"] == entry_layout("fp8_split", 32, 8)[1] / 4
    run = CliRunner().invoke(main, ["generate", str(fp8_build), "--token-ids", "1,2,3", "--max-new-tokens", "4", "--json"])
    assert run.exit_code == 0 and len(json.loads(run.output)["token_ids"]) == 4


def test_compile_is_deterministic_with_calibration(fp8_build, tmp_path):
    spec = fp8_build.parent / "model.yaml"
    assert CliRunner().invoke(main, ["compile", str(spec), "-o", str(tmp_path / "again")]).exit_code == 0
    for rel in ("manifest.json", "report/calibration.json", "report/index.html"):
        assert (tmp_path / "again" / rel).read_bytes() == (fp8_build / rel).read_bytes(), rel


@pytest.fixture(scope="module")
def outlier_ckpt(tmp_path_factory, oracle_models):
    """An outlier-heavy layer: one weight of layer 1's shared-expert gate is 1e5 (its input channel is
    zeroed by the norm before it, so the model itself is unchanged by the outlier). A per-tensor scale
    then pushes every other weight of that matrix below e4m3's smallest subnormal; 1x32 blocks
    confine the damage to the outlier's own block."""
    path = save_hf(oracle_models[NAME], tmp_path_factory.mktemp("outlier") / "ckpt")
    t = load_file(path / "model.safetensors")
    norm, gate = "model.layers.1.ffn_norm.weight", "model.layers.1.ffn.shared_experts.w1.weight"
    t[norm], t[gate] = t[norm].clone(), t[gate].clone()
    t[norm][5], t[gate][0, 5] = 0.0, 1e5
    save_file(t, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _recipe(block):  # weight-only FP8 of just the outlier-heavy layer, so the scales are all that differ
    return {"weights": {"block": block, "scale_format": "fp32"}, "activations": {"mode": "none"}, "kv": "f32", "indexer": "f32",
            "skip": ["layers.0.*", "layers.2.*", "embed_tokens.*", "lm_head.*", "layers.1.self_attn.*",
                     "layers.1.mlp.experts.*"]}


def test_drift_gate_fails_a_bad_recipe_and_writes_nothing(outlier_ckpt, calib_data, tmp_path):
    gates = {"max_kl": 0.02}  # measured: per-tensor 0.070, 1x32 blocks 0.005
    bad = _yaml(tmp_path / "bad", outlier_ckpt, calib_data, _recipe("tensor"), gates)
    result = CliRunner().invoke(main, ["compile", str(bad), "-o", str(tmp_path / "bad" / "art")])
    assert result.exit_code == 1, result.output
    assert "drift gates failed; no artifact was written" in result.output and "max_kl" in result.output
    assert "FAILED" in result.output and not (tmp_path / "bad" / "art").exists()
    good = _yaml(tmp_path / "good", outlier_ckpt, calib_data, _recipe([1, 32]), gates)
    assert CliRunner().invoke(main, ["compile", str(good), "-o", str(tmp_path / "good" / "art")]).exit_code == 0
    forced = CliRunner().invoke(main, ["compile", str(bad), "-o", str(tmp_path / "bad" / "art"), "--allow-drift"])
    assert forced.exit_code == 0
    report = json.loads((tmp_path / "bad" / "art" / "report" / "calibration.json").read_text())
    assert report["gates"]["passed"] is False and report["gates"]["written_despite_failure"] is True


def test_report_diff_exit_codes(fp8_build, tmp_path, hf_checkpoints, calib_data):
    other = _yaml(tmp_path, hf_checkpoints[NAME], calib_data, {"experts": "fp8"}, {"max_kl": 1.0})
    assert CliRunner().invoke(main, ["compile", str(other), "-o", str(tmp_path / "art")]).exit_code == 0
    old, new = str(fp8_build), str(tmp_path / "art" / "report" / "calibration.json")
    ok = CliRunner().invoke(main, ["report", "diff", old, new])  # NEW's own gates (max_kl 1.0)
    assert ok.exit_code == 0 and "KL mean" in ok.output and "top-1 agreement" in ok.output
    strict = CliRunner().invoke(main, ["report", "diff", old, new, "--max-kl", "1e-9"])
    assert strict.exit_code == 1 and "FAILED" in strict.output
    drop = CliRunner().invoke(main, ["report", "diff", new, old, "--max-kl-increase", "-1"])
    assert drop.exit_code == 1 and "max_kl_increase" in drop.output
    missing = CliRunner().invoke(main, ["report", "diff", old, str(tmp_path / "nope.json")])
    assert missing.exit_code == 2


def test_fp8_pass_is_registered_with_documented_defaults():
    opts = PASSES["fp8"].options()
    assert opts.weights.block == [128, 128] and opts.activations.mode == "dynamic" and opts.kv == "fp8"
    assert "*.mlp.gate.*" in opts.skip and "*.compressor.kv_proj.*" in opts.skip

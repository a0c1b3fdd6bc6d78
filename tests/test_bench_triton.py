"""bench/triton_gpu.py's code paths, at tiny shapes under the interpreter (`--dry-run`), so the GPU
benchmark does not rot on machines without a GPU; and its no-GPU record says "not measured". And
bench/sm90_static.py: the attention kernel compiled for an H100 offline, checked for register spills."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "triton_gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("triton_gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_dry_run_exercises_every_section(tmp_path):
    out = tmp_path / "dry.json"
    result = _load().main(["--dry-run", "--out", str(out), "--attention-configs", '[{"DOT": "bf16"}]'])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["status"].startswith("dry run")
    assert {r["bucket"] for r in result["fp8_gemm"]} == {"decode", "prefill"}
    assert all(r["same_bits_run_to_run"]["same"] for r in result["fp8_gemm"])
    gemms = result["fp8_gemm"]
    assert [(r["tokens"], r["bucket"]) for r in gemms] == [(3, "decode"), (20, "decode"), (65, "prefill"),
                                                           (72, "prefill")]  # (FP8 GEMMs: decode up to 64 tokens)
    assert [isinstance(r["v4c_sum_by_torch"], dict) for r in gemms] == [True, True, True, False]  # below prefill's
    # 65 tokens: the artifact's bucket is prefill's; the decode bucket's config is timed beside it
    from v4c.targets.triton.configs import heuristic
    decode_cfg, prefill_cfg = (b["config"] for b in heuristic("linear_fp8"))
    assert [[t["config"] for t in r["tried"]] for r in gemms] == [[decode_cfg], [decode_cfg], [prefill_cfg, decode_cfg],
                                                                  [prefill_cfg]]
    assert [r["artifact_config"] for r in gemms] == [decode_cfg, decode_cfg, prefill_cfg, prefill_cfg]
    assert [r["batch"] for r in result["sparse_decode_attention"]] == [1, 2]
    assert all(r["gb_per_s"] > 0 for r in result["sparse_decode_attention"])
    for row in result["sparse_decode_attention"]:  # the default (fp32 dots off a GPU) and the bf16 one, each checked
        assert [t["config"] for t in row["configs_tried"]] == [{}, {"DOT": "bf16"}]
        assert row["configs_tried"][0]["rel_err_vs_reference"] < 1e-5
        assert row["configs_tried"][1]["rel_err_vs_reference"] < 2.5e-2
    (e2e,) = result["e2e_decode"]
    assert all(v["median"] > 0 for v in e2e["decode_tokens_per_s"].values()) and "speedup" in e2e


def test_the_gemm_bench_times_warp_specialized_configs_at_prefill_and_skips_a_wrong_result(tmp_path, monkeypatch):
    """gpu_session.sh gemm-ws: extra configs with WARP_SPEC are timed only at prefill-bucket calls (the
    K loop it was written for), and every config's result is checked against the reference before it is
    timed: one that is wrong (here: off by 10%, as a miscompile might be) is recorded with the error, never chosen."""
    from v4c.targets.triton.configs import CANDIDATES_WS
    module = _load()
    real = module._fp8_gemm
    monkeypatch.setattr(module, "_fp8_gemm", lambda x, q, s, c: real(x, q, s, c) * (1.1 if c.get("BLOCK_N") == 32
                                                                                    else 1.0))
    ws = CANDIDATES_WS[2]  # (the interpreter runs any of them; one keeps this quick)
    bad = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    result = module.main(["--dry-run", "--sections", "gemm", "--gemm-configs", json.dumps([ws, bad]),
                          "--out", str(tmp_path / "g.json")])
    for r in result["fp8_gemm"]:
        tried = {json.dumps(t["config"], sort_keys=True): t for t in r["tried"]}
        assert (json.dumps(ws, sort_keys=True) in tried) == (r["bucket"] == "prefill"), r
        assert "wrong result" in tried[json.dumps(bad, sort_keys=True)]["error"] and r["v4c_config"] != bad
        assert r["rel_err_vs_reference"] < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script measures instead")
def test_without_a_gpu_every_row_is_not_measured(tmp_path):
    result = _load().main(["--out", str(tmp_path / "r.json")])
    assert result["status"] == "not measured" and set(result["rows"].values()) == {"not measured"}


def test_the_siblings_bench_times_separate_and_joined_launches(tmp_path):
    """bench/triton_siblings.py's dry run: every group and token count, the joined results the separate ones'."""
    spec = importlib.util.spec_from_file_location("triton_siblings_bench", SCRIPT.parent / "triton_siblings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--dry-run", "--out", str(tmp_path / "s.json")])
    assert result["status"].startswith("dry run") and json.loads((tmp_path / "s.json").read_text()) == result
    assert [(r["group"], r["tokens"]) for r in result["rows"]] == [(n, m) for n in module.DRY["groups"]
                                                                   for m in module.DRY["tokens"]]
    for row in result["rows"]:
        assert row["launches_separate"] == len(row["sizes"]) and row["rel_diff_joined_vs_separate"] < 1e-6
        assert row["separate"]["median_s"] > 0 and row["joined"]["median_s"] > 0
    if not torch.cuda.is_available():
        assert module.main(["--out", str(tmp_path / "n.json")])["status"] == "not measured"


def test_host_overhead_times_every_entry_without_running_a_kernel(tmp_path):
    """bench/host_overhead.py on a tiny triton artifact: every Triton launch is skipped and counted, every plan
    entry of a decode step is timed, and the stateful ops are told apart; and the decode step with graphs."""
    spec = importlib.util.spec_from_file_location("host_overhead", SCRIPT.parent / "host_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "host.json"
    (row,) = module.main(["--configs", "hc4_mixed", "--steps", "3", "--prompt", "8", "--out", str(out)]).values()
    assert json.loads(out.read_text())["configs"]["hc4_mixed"] == json.loads(json.dumps(row))
    assert row["triton_launches_per_step"] >= row["entries_per_step"] > row["stateful_entries_per_step"] > 0
    assert {"norm_attention_rope", "linear_fp8", "moe_experts_q"} <= set(row["ops"])  # (fuse: attention, norms, RoPE)
    assert all(o["us_per_call"] > 0 for o in row["ops"].values())
    assert {op for op, o in row["ops"].items() if o["stateful"]} <= {"compress", "compress_pair", "rope_index_topk",
                                                                       "norm_attention_rope"}
    # torch kernels besides the Triton launches: no result copied into its buffer, the experts' bookkeeping in
    # its own kernel; the split-K GEMMs' sums and the stateful ops' few are what is left
    per_op = sum(o["torch_kernels_per_call"] * o["calls_per_step"] for o in row["ops"].values())
    assert row["torch_kernels_per_step"] == pytest.approx(per_op + row["executor_torch_kernels_per_step"], abs=1)
    assert row["ops"]["moe_experts_q"]["torch_kernels_per_call"] == 0
    assert all(set(o["torch_kernel_ops"]) <= {"sum"} for o in row["ops"].values() if not o["stateful"]), row["ops"]
    assert set(row["ops"]["norm_attention_rope"]["torch_kernel_ops"]) <= {"copy_"}  # the ring's rows
    # with CUDA graphs the decode step is one replay, its stateful steps reading the position on the device (with
    # kernels of their own for the ring and window buffers: fewer torch kernels, a few more Triton launches)
    graphs = row["graphs"]
    assert graphs["host_calls_per_step"] == graphs["graphs"] == 1
    assert graphs["entries_in_graphs"] == graphs["entries"] == row["entries_per_step"]
    assert graphs["torch_kernels_per_step"] < row["torch_kernels_per_step"]
    assert graphs["triton_launches_per_step"] > row["triton_launches_per_step"]


@pytest.mark.slow
def test_the_step_check_compares_every_launch_with_its_torch_kernel(tmp_path):
    """bench/triton_gpu_check.py (meant for a GPU) in its interpreter mode: every launch of a tiny triton
    artifact, prefill and decode, matches its torch kernel on the same inputs, state included."""
    spec = importlib.util.spec_from_file_location("triton_gpu_check", SCRIPT.parent / "triton_gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--config", "hc4_mixed", "--device", "cpu", "--prompt", "20", "--new", "2",
                          "--out", str(tmp_path / "check.json")])
    assert {"linear_fp8", "moe_experts_q", "norm_attention_rope", "rope_index_topk", "hc_pre"} <= set(result["kernels"])
    assert all(k["calls"] > 0 and k["max_err"] < 1e-5 for k in result["kernels"].values()), result["kernels"]
    # encoded entries: the compressor's pooled values differ from the reference's in summation order, which
    # moves a few fp32 indexer-key scales (stored as 4 bytes) by an ulp (measured: 3 of 180 bytes)
    assert all(k["state_bytes_differ"] < 0.05 for k in result["kernels"].values()), result["kernels"]
    assert result["logits"]["triton_device_vs_torch_device"]["argmax_agreement"] == 1.0


def test_the_decode_kernels_compile_for_an_h100_without_spills(tmp_path):
    """bench/sm90_static.py compiles the attention, indexer, mHC, GEMM and MoE launchers' kernels for sm_90a with Triton's
    bundled ptxas (no GPU needed). At V4-Flash decode shapes the default configs must not spill: before, attention
    spilled ~4 KB a thread and the indexer's scores ~7 KB (bench/results/sm90_static_before.json), which local
    memory serves far below the kernels' bandwidth. The experts' prefill heuristic must take Hopper's fp8 wgmma
    over activations quantized once, without spills; their decode bookkeeping (one program, a one-hot over 256
    experts) must not spill either, nor the attention, indexer and compressor kernels (a CSA layer's pair included)
    at a device position (a decode step in a CUDA graph), nor the FP8 GEMMs and experts (the fuse pass's q_b_proj and gate_up reading e4m3 codes
    included, and the triton target's q_b_proj norming its own tiles)."""
    out = tmp_path / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT.parent / "sm90_static.py"), "--only",
                          "attention,indexer,compress,hyper,gemm,moe", "--batches", "64", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"_attention_kernel", "_combine_kernel", "_score_kernel",
                                          "_act_quant_kernel", "_experts_gemm_kernel", "_pairs_kernel",
                                          "_compress_kernel", "_compress_pair_kernel", "_gemm_kernel",
                                          "_rms_norm_kernel", "_rms_norm_quant_kernel", "_hc_pre_kernel",
                                          "_hc_head_kernel"}
    # the fuse pass's q_a_norm -> q_b_proj: the GEMM reads the norm's e4m3 codes (ACT 3), and a prefill
    # no longer quantizes them again in its own kernel
    fused = [r for r in rows if r["case"].startswith("rms_norm_quant + linear_fp8 q_b")]
    assert {r["kernel"] for r in fused} == {"_rms_norm_quant_kernel", "_gemm_kernel"}
    assert all(r["constexprs"]["ACT"] == 3 for r in fused if r["kernel"] == "_gemm_kernel")
    unfused = [r for r in rows if r["case"].startswith("rms_norm + linear_fp8 q_b") and r["case"].endswith("m=4096")]
    assert "_act_quant_kernel" in {r["kernel"] for r in unfused}
    # the triton target's norm_gemm: at decode one GEMM launch norms its own tiles (NORM: the row block, 1024 for
    # q_b's K, 4096 for the input norm folded into q_a + kv), at prefill the norm kernel quantizes once
    for case in ("norm_linear_fp8 q_b", "norm_linear_fp8 q_a+kv"):
        (decode,) = [r for r in rows if r["case"].startswith(case) and r["case"].endswith("m=16")]
        assert decode["kernel"] == "_gemm_kernel" and decode["constexprs"]["ACT"] == 1, decode
        assert decode["constexprs"]["NORM"] == (1024 if "q_b" in case else 4096), decode
    prefill = [r for r in rows if r["case"].startswith("norm_linear_fp8 q_b") and r["case"].endswith("m=4096")]
    assert [r["kernel"] for r in prefill] == ["_rms_norm_quant_kernel", "_gemm_kernel"]
    assert prefill[1]["constexprs"]["ACT"] == 3 and prefill[1]["constexprs"]["NORM"] == 0
    # ... and the routed experts' gate_up reads post_attention_layernorm's codes: below 64 pairs no tile quantizes
    # x (ACT 3, not 2), from 64 pairs on only down's input is still quantized by its own kernel
    for m, quant_launches in ((4, 0), (16, 1)):
        case = [r for r in rows if r["case"].endswith(f" m={m} (e4m3 codes)")]
        gate_up = next(r for r in case if r["kernel"] == "_experts_gemm_kernel")
        assert gate_up["constexprs"]["SWIGLU"] is True and gate_up["constexprs"]["ACT"] == 3
        assert sum(r["kernel"] == "_act_quant_kernel" for r in case) == quant_launches
    # up to 64 pairs the gate_up programs sort them (PAIRS_IN_KERNEL): no _pairs_kernel launch
    in_gate_up = [r for r in rows if r["case"].endswith("(pairs in gate_up)")]
    assert [r["kernel"] for r in in_gate_up] == ["_experts_gemm_kernel"] * 2
    assert in_gate_up[0]["constexprs"]["PAIRS"] == 64 and in_gate_up[1]["constexprs"]["PAIRS"] == 0
    plain = next(r for r in rows if r["case"].endswith(" m=4 (fp32 x)") and r["kernel"] == "_experts_gemm_kernel")
    assert plain["constexprs"]["ACT"] == 2
    assert {r["case"] for r in rows if r["kernel"] in ("_attention_kernel", "_score_kernel")} >= {
        "attention CSA fp8_split batch=64 at a device position", "index_topk fp8_block batch=64 at a device position"}
    experts = [r for r in rows if r["kernel"] == "_experts_gemm_kernel" and r["case"].endswith("m=4096")]
    assert len(experts) == 6  # gate_up and down of FP8 experts, FP4 ones, and FP4 ones with the FP8 shared expert
    for r in experts:
        wgmma = "QGMMA" if r["case"].startswith("moe_experts_q fp8") else "HGMMA"  # FP4: bf16 dots over the codes
        assert r["constexprs"]["ACT"] == 3 and r["constexprs"]["FP8_DOT"] is True and r["sass"].get(wgmma, 0) > 0, r
    # FP4 experts at decode: bf16 mma over the codes (dequantized for fp32 dots, ptxas spilled 11.5 KB), and the
    # shared expert's FP8 tiles in the same launch
    fp4 = [r for r in rows if r["kernel"] == "_experts_gemm_kernel" and " fp4 " in r["case"] and r["case"].endswith("m=16")]
    assert len(fp4) == 4 and all(r["constexprs"]["FP8_DOT"] and r["sass"].get("HMMA", 0) > 0 for r in fp4), fp4
    assert [r["constexprs"]["SHARED"] for r in fp4] == [False, False, True, True]
    # a decode GEMM splits K over the SMs and its last program per tile adds the partial sums (no torch.sum): one
    # thread counts arrivals with a GPU-scope fence before (MEMBAR: the partial sums are released) and an L1
    # invalidation after (CCTL: the last program reads the others' sums), and zeroes the counter (2 atomics)
    split = next(r for r in rows if r["kernel"] == "_gemm_kernel" and r["case"].endswith("expert_gate_up n=4096 "
                                                                                          "k=4096 m=16"))
    assert split["constexprs"]["SPLIT"] > 1 and split["constexprs"]["SUM_IN_KERNEL"] is True, split
    assert split["sass"].get("ATOMG") == 2 and split["sass"].get("MEMBAR", 0) >= 1 and split["sass"].get("CCTL"), split
    # mHC's projections of one decode token are split over the SMs (one run per K tile of fn: 32), finished by the
    # last run with the same release / acquire; a prefill's 4096 tokens keep one program each
    for r in rows:
        if r["kernel"] in ("_hc_pre_kernel", "_hc_head_kernel"):
            split = {"tokens=1": 32, "tokens=16": 16, "tokens=4096": 1}[r["case"].split()[-1]]
            assert r["constexprs"]["SPLIT"] == split and r["grid"][1] == split, r
            assert (r["sass"].get("ATOMG"), bool(r["sass"].get("MEMBAR")), bool(r["sass"].get("CCTL"))) == (
                (2, True, True) if split > 1 else (None, False, False)), r
    attn = next(r for r in rows if r["kernel"] == "_attention_kernel")
    assert attn["constexprs"]["DOT"] == "bf16" and attn["constexprs"]["NATIVE"] is True  # decided as on a GPU
    # attention is one launch (no encode, combine or ring launch; the _combine_kernel above is the MoE's): its
    # programs encode the new keys, the last split run of a (query, head block) merges the runs, the last program
    # of a batch row writes its ring, each after a release / acquire
    assert {r["kernel"] for r in rows if r["case"].startswith("attention")} == {"_attention_kernel"}
    for r in rows:
        if r["kernel"] == "_attention_kernel":
            assert r["constexprs"]["IN_KERNEL"] is True and r["constexprs"]["RING"] is True, r
            assert r["constexprs"]["ENCODE"] is True, r
            assert r["sass"].get("ATOMG") == 4 and r["sass"].get("MEMBAR") and r["sass"].get("CCTL"), r
    assert attn["sass"].get("HMMA", 0) + attn["sass"].get("HGMMA", 0) > 0  # tensor-core dots
    for r in rows:
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r


@pytest.mark.slow
def test_every_warp_specialized_gemm_candidate_compiles_warp_specialized_without_spills(tmp_path):
    """configs.CANDIDATES_WS, the FP8 GEMM configs the tuner times with WARP_SPEC (persistent or not) at prefill: in
    each form of the GEMM an artifact launches (quantized once, codes, joined siblings, SwiGLU, RMSNorm, grouped;
    4096 and 300 tokens, the latter split-K unless persistent), Triton warp-specializes the K loop (the tile loop when
    persistent) for sm_90a (12 warps: 4 of the default partition and two more groups, each with its register
    limit) with fp8 wgmma, no spills, and the TMA loads in it."""
    from v4c.targets.triton.configs import CANDIDATES_WS
    out = tmp_path / "ws.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT.parent / "sm90_static.py"), "--only", "none", "--ws-candidates",
                          "--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [r for r in json.loads(out.read_text())["rows"] if r["kernel"] == "_gemm_kernel"]
    assert len(rows) == 2 * 6 * len(CANDIDATES_WS)  # 2 token counts x 6 forms
    for r in rows:
        assert r["constexprs"]["TMA_WS"] is True and r["warp_specialized"] and r["total_warps"] == 12, r
        assert r["constexprs"]["PERSIST"] is bool(r["config"].get("PERSISTENT")), r
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r
        assert r["sass"].get("QGMMA", 0) > 0 and r["sass"].get("UTMALDG", 0) > 0, r


@pytest.mark.slow
def test_every_fp4_expert_candidate_the_tuner_times_compiles_without_spills(tmp_path):
    """configs.CANDIDATES_FP4: of the expert candidate grid, the tuner times for FP4 experts only the configs that
    compile for sm_90a without spills at V4-Flash's expert shapes (both GEMMs, decode and prefill); 18 of the
    grid's 28 spilled 52 B to 13 KB a thread. bench/sm90_static.py --moe-candidates fp4 compiles the whole grid."""
    from v4c.targets.triton.configs import CANDIDATES_FP4
    out = tmp_path / "candidates.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT.parent / "sm90_static.py"), "--only", "none",
                          "--moe-candidates", "fp4", "--out", str(out)], capture_output=True, text=True, env=env,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [r for r in json.loads(out.read_text())["rows"] if r["kernel"] == "_experts_gemm_kernel"]
    tuned = [r for r in rows if r["tuned"]]
    assert len(tuned) == 2 * sum(len(c) for c in CANDIDATES_FP4.values())  # gate_up and down of each
    for r in tuned:
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r
        assert r["constexprs"]["FP8_DOT"] is True and r["sass"].get("HMMA", 0) + r["sass"].get("HGMMA", 0) > 0, r

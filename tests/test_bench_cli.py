"""`v4c bench`: the measurements it reports, each from its own process, and its input errors.
Timings are recorded, never asserted."""

import json

import pytest
from click.testing import CliRunner

from v4c.bench import decode_bytes
from v4c.cli import main
from v4c.runtime.artifact import open_artifact

NAME = "hc3_topk_large"  # CSA, HCA and sliding layers; 5 experts, 3 per token


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, hf_checkpoints):
    root = tmp_path_factory.mktemp("bench")
    (root / "model.yaml").write_text(f"model:\n  checkpoint: {hf_checkpoints[NAME]}\ntarget: torch\npasses: []\n"
                                     "kv:\n  max_context: 64\n  prefill_chunk: 16\n")
    result = CliRunner().invoke(main, ["compile", str(root / "model.yaml"), "-o", str(root / "art"), "-q"])
    assert result.exit_code == 0, result.output
    return root / "art"


def test_bench_against_transformers_reports_every_figure(artifact, hf_checkpoints, tmp_path):
    out = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["bench", str(artifact), "--baseline", "transformers", "--checkpoint",
                                       str(hf_checkpoints[NAME]), "--context", "40", "--new-tokens", "3", "--runs", "2",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert set(r["systems"]) == {"v4c", "transformers_fp32", "transformers_bf16"} and r["runs"] == 2
    for s in r["systems"].values():
        for key in ("prefill_tokens_per_s", "ttft_s", "decode_tokens_per_s", "decode_step_s", "peak_rss_bytes"):
            assert 0 < s[key]["min"] <= s[key]["median"] <= s[key]["max"]
        assert s["peak_rss_bytes"]["min"] > 50 << 20  # torch alone is bigger than this: VmHWM was read
    v = r["systems"]["v4c"]
    assert v["achieved_bytes_per_s"] > 0 and r["memory_bandwidth_bytes_per_s"] > 0
    assert v["fraction_of_bandwidth"] == pytest.approx(v["achieved_bytes_per_s"] / r["memory_bandwidth_bytes_per_s"])
    assert r["decode_speedup_vs_best_transformers"] > 0 and r["machine"]["cores"] >= 1
    assert "decode tok/s" in result.output and "copy bandwidth" in result.output


def test_decode_bytes_count_the_selected_experts_and_the_visible_kv(artifact):
    art = open_artifact(artifact)
    cfg, program = art.config, art.program
    one, four = decode_bytes(art, 1, 40), decode_bytes(art, 4, 40)
    experts = sum(p.shape[0] == cfg.n_routed_experts and len(p.shape) == 3 for p in program.params.values())
    assert experts > 0
    # batch 1 reads k of the E experts; batch 4 can select all of them; everything else is read once
    assert four["weight_bytes"] > one["weight_bytes"] and four["kv_bytes"] == 4 * one["kv_bytes"]
    assert decode_bytes(art, 1, 60)["kv_bytes"] > one["kv_bytes"]  # longer context: more entries and keys


@pytest.mark.parametrize("args, message", [
    (["--context", "60", "--new-tokens", "10"], "max_context 64"),
    (["--baseline", "transformers", "--context", "8", "--new-tokens", "4"], "--checkpoint"),
])
def test_bench_input_errors(artifact, args, message):
    result = CliRunner().invoke(main, ["bench", str(artifact), *args])
    assert result.exit_code == 2 and message in result.output, result.output

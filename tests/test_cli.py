"""The CLI contracts: compile, score (one prefill or chunked), generate; bad input is a clean error."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import rel_err, tokens
from v4c.cli import main

NAME = "hc1_topk_small"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, hf_checkpoints):
    root = tmp_path_factory.mktemp("cli")
    (root / "model.yaml").write_text(f"model:\n  checkpoint: {hf_checkpoints[NAME]}\ntarget: torch\npasses: []\n"
                                     "kv:\n  max_context: 64\n")
    result = CliRunner().invoke(main, ["compile", str(root / "model.yaml"), "-o", str(root / "art"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert [p["name"] for p in summary["pipeline"]] == ["dce", "kv_plan", "memory_plan"]
    return root / "art"


def _ids(t):
    return ",".join(map(str, t))


def test_compile_writes_manifest_ir_program_and_weights(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["format"] == "v4c-artifact" and manifest["format_version"] == "1.0"
    assert manifest["target"]["name"] == "torch" and manifest["kv"]["max_context"] == 64
    assert (artifact / "module.v4ir").read_text().startswith("v4ir 1\n")
    assert set(manifest["files"]) >= {"module.v4ir", "program.json", *manifest["weights"]}


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_score_matches_the_oracle(chunk, artifact, oracle_models, tmp_path):
    ids = tokens(1, 50, seed=9)[0].tolist()
    out = tmp_path / "logits.npy"
    args = ["score", str(artifact), "--token-ids", _ids(ids), "--logits-out", str(out)]
    result = CliRunner().invoke(main, args + (["--chunk", str(chunk)] if chunk else []))
    assert result.exit_code == 0, result.output
    logits = np.load(out)
    assert logits.dtype == np.float32 and logits.shape == (50, 97)
    with torch.no_grad():
        ref = oracle_models[NAME](torch.tensor([ids])).logits[0]
    assert rel_err(torch.from_numpy(logits), ref) <= 1e-4


def test_generate_json_and_streaming_agree(artifact):
    base = ["generate", str(artifact), "--token-ids", "5,6,7,8", "--max-new-tokens", "12"]
    as_json = CliRunner().invoke(main, base + ["--json"])
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.output)
    assert len(payload["token_ids"]) == 12 and payload["text"] is None  # no tokenizer in this checkpoint
    streamed = CliRunner().invoke(main, base)
    assert streamed.output.split() == [str(t) for t in payload["token_ids"]]


def test_sampling_is_seeded(artifact):
    base = ["generate", str(artifact), "--token-ids", "5,6,7", "--max-new-tokens", "10", "--json",
            "--temperature", "1.5", "--top-k", "20", "--top-p", "0.9"]
    runs = [json.loads(CliRunner().invoke(main, base + ["--seed", s]).output)["token_ids"] for s in ("1", "1", "2")]
    assert runs[0] == runs[1] != runs[2]


@pytest.mark.parametrize("args, message", [
    (["score", "--token-ids", "3,97,5"], "token id 97 is outside the vocabulary [0, 97)"),
    (["score", "--token-ids", "-1,2"], "token id -1 is outside the vocabulary"),
    (["score", "--token-ids", ",".join(["1"] * 65)], "65 tokens exceed the artifact's planned context of 64"),
    (["generate", "--token-ids", "", "--max-new-tokens", "3"], "the prompt is empty"),
    (["generate", "--token-ids", ",".join(["1"] * 60), "--max-new-tokens", "10"], "needs 69 positions"),
    (["generate", "--prompt", "hello", "--max-new-tokens", "3"], "has no tokenizer; pass --token-ids"),
    (["score", "--token-ids", "1,x"], "expected comma-separated integers"),
])
def test_bad_input_is_a_clean_error(args, message, artifact, tmp_path):
    cmd = [args[0], str(artifact), *args[1:]]
    if args[0] == "score":
        cmd += ["--logits-out", str(tmp_path / "x.npy")]
    result = CliRunner().invoke(main, cmd)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_missing_artifact_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "nope"), "--token-ids", "1", "--max-new-tokens", "1"])
    assert result.exit_code == 2 and "is not an artifact directory" in result.output

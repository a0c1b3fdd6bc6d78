"""The committed tiny-v4 example: its provenance, and its compiled artifact against transformers."""

import hashlib
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer
from transformers import DeepseekV4ForCausalLM

from conftest import rel_err
from v4c.cli import main
from v4c.runtime.artifact import open_artifact

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-v4"
PROVENANCE = json.loads((EXAMPLE / "provenance.json").read_text())
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _heldout_files():
    files = [STDLIB / f["file"] for f in PROVENANCE["corpus"]["files"] if f["held_out"]]
    same = all(p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == f["sha256"]
               for p, f in zip(files, [f for f in PROVENANCE["corpus"]["files"] if f["held_out"]]))
    return files, same


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("example") / "tiny-v4"
    result = CliRunner().invoke(main, ["compile", str(EXAMPLE / "model.yaml"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def oracle():
    model = DeepseekV4ForCausalLM.from_pretrained(EXAMPLE / "checkpoint", dtype=torch.float32)
    model.set_experts_implementation("eager")
    return model.eval()


def test_example_is_small_and_documented():
    size = sum(p.stat().st_size for p in (EXAMPLE / "checkpoint").iterdir())
    assert size <= 10 * 2**20
    assert PROVENANCE["heldout_loss_bf16_weights"] < 0.7 * PROVENANCE["heldout_unigram_loss"]
    readme = (EXAMPLE / "README.md").read_text()
    for key in ("heldout_loss_bf16_weights", "heldout_unigram_loss", "final_train_loss"):
        assert f"{PROVENANCE[key]:.4f}" in readme, f"README.md does not state {key}"
    cfg = json.loads((EXAMPLE / "checkpoint" / "config.json").read_text())
    assert set(cfg["layer_types"]) == {"sliding_attention", "compressed_sparse_attention",
                                       "heavily_compressed_attention"}
    assert set(cfg["mlp_layer_types"]) == {"hash_moe", "moe"} and cfg["hc_mult"] > 1


def test_score_of_the_compiled_example_matches_transformers(artifact, oracle, tmp_path):
    files, _ = _heldout_files()
    tok = Tokenizer.from_file(str(EXAMPLE / "checkpoint" / "tokenizer.json"))
    ids = tok.encode(files[0].read_text(encoding="utf-8", errors="replace")).ids[:300]
    out = tmp_path / "logits.npy"
    result = CliRunner().invoke(main, ["score", str(artifact), "--token-ids", ",".join(map(str, ids)),
                                       "--logits-out", str(out)])
    assert result.exit_code == 0, result.output
    with torch.no_grad():
        ref = oracle(torch.tensor([ids])).logits[0]
    assert rel_err(torch.from_numpy(np.load(out)), ref) <= 1e-4


@pytest.mark.slow
def test_heldout_loss_of_the_artifact_reproduces_the_recorded_one(artifact):
    """Recompute the held-out loss through the compiled artifact (needs the same stdlib files)."""
    files, same = _heldout_files()
    if not same:
        pytest.skip(f"this Python's standard library differs from the recorded corpus ({STDLIB})")
    art = open_artifact(artifact)
    tok = art.tokenizer()
    stream = []
    for f in files:
        stream += tok.encode(f.read_text(encoding="utf-8", errors="replace")).ids + [1]
    seq, total, count = 256, 0.0, 0
    stream = torch.tensor(stream)
    for i in range((len(stream) - 1) // seq):
        window = stream[i * seq:(i + 1) * seq + 1]
        logits = art.session().forward(window[None, :-1])[0]
        total += float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
        count += seq
    assert abs(total / count - PROVENANCE["heldout_loss_bf16_weights"]) < 1e-3

"""The runtime's torch reference kernels create every tensor on their inputs' device, so an artifact
runs with `kernels="torch"` on a GPU as on the CPU (the triton benchmark compares against it there).

No GPU here: the test makes `meta` the default device while a CPU session runs. A tensor made without
`device=` then lands on meta, and using it beside the CPU tensors raises (or leaves no data to read)."""

import pytest
import torch
from click.testing import CliRunner

from conftest import tokens
from v4c.cli import main
from v4c.runtime.artifact import open_artifact

NAME = "hc4_mixed"  # CSA, sliding and HCA layers, indexer, compressor; hash and top-k MoE; hc_mult 4
RECIPES = {
    "fp32": "  []\n",
    "fp8_fp4": "  - fp8:\n      weights: {block: [32, 32], scale_format: ue8m0}\n      experts: fp4\n"
               "      activations: {mode: dynamic, group: 16}\n      kv: fp8\n      indexer: fp4\n      skip: []\n",
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, hf_checkpoints):
    root, out = tmp_path_factory.mktemp("device"), {}
    for name, passes in RECIPES.items():
        yaml = root / f"{name}.yaml"
        yaml.write_text(f"model:\n  checkpoint: {hf_checkpoints[NAME]}\ntarget: torch\npasses:\n{passes}"
                        "kv:\n  max_context: 48\n  prefill_chunk: 16\n")
        result = CliRunner().invoke(main, ["compile", str(yaml), "-o", str(root / name), "-q"])
        assert result.exit_code == 0, result.output
        out[name] = open_artifact(root / name)
    return out


def _generate(art, ids, new: int) -> torch.Tensor:
    session = art.session(ids.shape[0], kernels="torch", device="cpu")
    logits = [session.forward(ids[:, :16]), session.forward(ids[:, 16:])]
    for _ in range(new):
        logits.append(session.forward(logits[-1][:, -1:].argmax(-1)))
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("recipe", RECIPES)
def test_reference_kernels_make_no_tensor_off_their_inputs_device(artifacts, recipe):
    ids = tokens(2, 30, seed=4)
    expected = _generate(artifacts[recipe], ids, 4)
    torch.set_default_device("meta")
    try:
        got = _generate(artifacts[recipe], ids, 4)  # prefill past the window and the compress rates, then decode
    finally:
        torch.set_default_device(None)
    assert got.device.type == "cpu" and torch.equal(got, expected)

import os

# No GPU in CI or on the dev machines: Triton kernels run in the interpreter (set before triton is imported).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from oracle import CONFIGS, make_model, save_hf
from program_order import session_order, shuffled_programs

SEEDS = {"hc1_topk_small": 11, "hc2_yarn": 12, "hc3_topk_large": 13, "hc4_mixed": 14}


@pytest.fixture(scope="session", autouse=True)
def program_order():
    """Interpreted launches run their programs in a shuffled order, as a GPU may (tests/program_order.py)."""
    seed = session_order()
    if seed is None:
        yield None
        return
    with shuffled_programs(seed) as shuffle:
        yield shuffle


@pytest.fixture(autouse=True)
def _program_order_per_test(request, program_order):
    """Each test's launches shuffle from its own seed: a failure reproduces when the test runs alone."""
    if program_order is not None:
        program_order.reseed(request.node.nodeid)


@pytest.fixture(scope="session")
def oracle_models():
    """name -> randomized fp32 DeepseekV4ForCausalLM (the oracle)."""
    return {name: make_model(name, seed=SEEDS[name]) for name in CONFIGS}


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory, oracle_models):
    """name -> directory written by transformers' save_pretrained."""
    out = {}
    for name, model in oracle_models.items():
        out[name] = save_hf(model, tmp_path_factory.mktemp(name) / "ckpt")
    return out


def tokens(batch: int, length: int, seed: int = 0, vocab: int = 97) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: the parity measure of the issue (bound 1e-4)."""
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())

"""The triton target routes a MoE block's shared expert with the routed experts (targets/triton/shared_expert.py),
under TRITON_INTERPRET=1 (conftest). Tolerances: the torch kernels of the rewritten program compute the same sums
(the shared expert as expert E, added last) as those of the program without the rewrite: 1e-6 x max|logit|
(measured equal). With the Triton kernels the shared expert's dots are the expert kernel's instead of the GEMM
kernel's, an fp32 summation order apart, which can move an FP8 activation across an e4m3 rounding boundary: the
FP8 bound of tests/test_triton_target.py, 2e-2 x max|logit| and the same greedy tokens (measured: equal under the
interpreter, whose dots sum alike here).
"""
import json

import pytest
import torch

from conftest import rel_err, tokens
from test_triton_target import NAME, _compile, _prefill_then_decode
from v4c.frontend import import_checkpoint
from v4c.ir import verify
from v4c.pipeline import run_pipeline
from v4c.runtime.artifact import open_artifact
from v4c.runtime.describe import describe
from v4c.spec import PassSpec
from v4c.targets.triton import shared_expert

# FP8 experts (the shared expert's format); blocks of 4 rows divide the tiny configs' inter size (20)
RECIPE = ("  - fp8:\n      weights: {block: [4, 16], scale_format: ue8m0}\n"
          "      activations: {mode: dynamic, group: 16}\n      kv: fp8\n      indexer: fp4\n      skip: []\n"
          "  - fuse\n")
MOE_LAYERS, EXPERTS = 3, 6  # hc4_mixed: 3 MoE blocks (hash, top-k, top-k) of 6 routed experts, top-2


def _folded_and_plain(root, ckpt, recipe):
    """The triton build of `recipe`, and one without the rewrite."""
    folded = _compile(root, ckpt, "triton", recipe, name="folded")
    mp = pytest.MonkeyPatch()
    mp.setattr(shared_expert, "fold", lambda m: (m, 0))
    try:
        plain = _compile(root, ckpt, "triton", recipe, name="plain")
    finally:
        mp.undo()
    return folded, plain


@pytest.fixture(scope="module")
def arts(tmp_path_factory, hf_checkpoints):
    return _folded_and_plain(tmp_path_factory.mktemp("shared"), hf_checkpoints[NAME], RECIPE)


def _steps(art):
    return json.loads((art / "program.json").read_text())["steps"]


def test_the_shared_expert_is_one_more_routed_expert(arts):
    folded, plain = arts
    kernels = json.loads((folded / "manifest.json").read_text())["target"]["kernels"]
    assert kernels["shared_experts_routed"] == MOE_LAYERS
    steps, plain_steps = _steps(folded), _steps(plain)
    assert not any(s["kernel"] == "swiglu_linear_fp8" for s in steps)
    assert sum(s["kernel"] == "swiglu_linear_fp8" for s in plain_steps) == MOE_LAYERS
    assert len(plain_steps) == len(steps) + 2 * MOE_LAYERS  # the shared gate+up GEMM, the SwiGLU+down GEMM
    routers = [s for s in steps if s["kernel"] in ("route_topk", "route_hash")]
    assert len(routers) == MOE_LAYERS and all(s["attrs"]["shared"] is True for s in routers)
    params = json.loads((folded / "program.json").read_text())["params"]
    experts = [s for s in steps if s["kernel"] == "moe_experts_q"]
    for s in experts:
        gate_up, down = params[s["inputs"][3][1:]], params[s["inputs"][5][1:]]
        assert ".experts+shared." in s["inputs"][3] and gate_up["shape"][0] == down["shape"][0] == EXPERTS + 1
    assert not any(n.startswith("layers.") and ".shared_experts." in n for n in params)  # stored once, stacked
    components = describe(open_artifact(folded))["weights"]["by_component"]
    assert "experts + shared expert" in components and "other" not in components
    addends = {"hc_post": 5, "hc_post_pre": 8, "hc_post_pre_quant": 9}  # operand counts with the addend
    assert not any(len(s["inputs"]) == addends.get(s["kernel"]) for s in steps)
    assert any(len(s["inputs"]) == addends.get(s["kernel"]) for s in plain_steps)


def _same_results(folded, plain, seed):
    """A 16-token prefill, then 3 decode steps: the torch kernels' sums as without the rewrite, the Triton
    kernels' within the FP8 bound with the same greedy tokens."""
    ids = tokens(1, 19, seed=seed)
    ref = _prefill_then_decode(open_artifact(plain).session(kernels="torch"), ids, 16)
    assert rel_err(_prefill_then_decode(open_artifact(folded).session(kernels="torch"), ids, 16), ref) <= 1e-6
    ours = _prefill_then_decode(open_artifact(folded).session(), ids, 16)
    base = _prefill_then_decode(open_artifact(plain).session(), ids, 16)
    assert rel_err(ours, base) <= 2e-2 and rel_err(ours, ref) <= 2e-2
    assert torch.equal(ours.argmax(-1), base.argmax(-1))


def test_routing_the_shared_expert_changes_no_result(arts):
    _same_results(*arts, seed=4)


FP4 = RECIPE.replace("      kv: fp8\n", "      experts: fp4\n      kv: fp8\n")


@pytest.fixture(scope="module")
def fp4_arts(tmp_path_factory, hf_checkpoints):
    return _folded_and_plain(tmp_path_factory.mktemp("shared_fp4"), hf_checkpoints[NAME], FP4)


@pytest.mark.slow  # 40-100 s of artifacts under the interpreter; make test-all
def test_fp4_experts_take_their_shared_expert_in_their_launches(fp4_arts):
    """FP4 experts (DeepSeek's release format) cannot stack with the FP8 shared expert: moe_experts_q_shared routes
    it as expert E over its own weights (gate and up joined), 2 launches a layer fewer, and the results stay
    within the FP8 bound of the build without the rewrite (the torch kernels: equal sums)."""
    folded, plain = fp4_arts
    assert json.loads((folded / "manifest.json").read_text())["target"]["kernels"]["shared_experts_routed"] == MOE_LAYERS
    steps, plain_steps = _steps(folded), _steps(plain)
    assert len(plain_steps) == len(steps) + 2 * MOE_LAYERS
    assert [s["kernel"] for s in steps].count("moe_experts_q_shared") == MOE_LAYERS
    assert not any(s["kernel"] in ("moe_experts_q", "swiglu_linear_fp8") for s in steps)
    params = json.loads((folded / "program.json").read_text())["params"]
    for s in (s for s in steps if s["kernel"] == "moe_experts_q_shared"):
        gate_up, own = params[s["inputs"][3][1:]], params[s["inputs"][7][1:]]
        assert gate_up["dtype"] == "i8" and gate_up["shape"][0] == EXPERTS  # FP4, two codes a byte
        assert ".shared_experts.gate_proj+up_proj." in s["inputs"][7] and own["dtype"] == "f8e4m3"
        assert own["shape"][0] == 2 * params[s["inputs"][9][1:]]["shape"][1]  # [2I, D] beside down [D, I]
        assert s["attrs"]["shared_block"] == s["attrs"]["shared_down_block"] == [4, 16]
    components = describe(open_artifact(folded))["weights"]["by_component"]
    assert {"routed experts", "shared expert"} <= set(components) and "other" not in components
    _same_results(folded, plain, seed=5)


def _module(hf_checkpoints, block, experts=None):
    module = import_checkpoint(hf_checkpoints[NAME], max_context=64)[0]
    fp8 = {"weights": {"block": block, "scale_format": "ue8m0"}, "activations": {"mode": "dynamic", "group": 16},
           "skip": [], **({"experts": experts} if experts else {})}
    return run_pipeline(module, [PassSpec(name="fp8", options=fp8), PassSpec(name="fuse")])


@pytest.mark.parametrize("experts, op", [(None, "moe_experts_q"), ("fp4", "moe_experts_q_shared")])
def test_the_rewrite_takes_only_a_shared_expert_like_the_experts(hf_checkpoints, experts, op):
    """A block whose shared expert differs from its experts keeps it: another SwiGLU limit, or gate rows that end
    in a partial scale block (whose scales would not stack as [2I / rows] blocks, nor join the up rows')."""
    m = _module(hf_checkpoints, [4, 16], experts)
    folded, n = shared_expert.fold(m)
    assert n == MOE_LAYERS
    verify(folded)
    assert not any(ins.op == "swiglu_linear_fp8" for ins in folded.func.body)
    assert [ins.op for ins in folded.func.body].count(op) == MOE_LAYERS
    swiglus = [ins for ins in m.func.body if ins.op == "swiglu_linear_fp8"]
    swiglus[1].attrs = {**swiglus[1].attrs, "limit": swiglus[1].attrs["limit"] + 1}
    assert shared_expert.fold(m)[1] == MOE_LAYERS - 1
    assert shared_expert.fold(_module(hf_checkpoints, [3, 16], experts))[1] == 0  # inter 20: 3-row blocks end partial

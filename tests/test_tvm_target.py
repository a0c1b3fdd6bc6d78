"""The tvm target end to end: the artifact carries one kernel library, the runtime loads it with
tvm_ffi alone (a process where `import tvm` fails runs it), a tvm artifact matches the torch
target on examples/tiny-v4 (fp32 and the FP8 recipe), steps without a TVM kernel are reported, and a
library this CPU cannot run is refused with the reason.

Tolerances: the fp32 build differs from the torch target by summation order only (1e-5 x
max|logit|). The FP8 build quantizes activations on the fly; a one-ulp difference can move a value
across an e4m3 rounding boundary and propagate, so there the bound is 2e-2 x max|logit| and the
same greedy tokens (each kernel on identical inputs is held to 1e-5 in test_tvm_gemv.py).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import rel_err
from v4c.compile import compile_model
from v4c.runtime import tvm_kernels
from v4c.runtime.artifact import open_artifact
from v4c.runtime.errors import ArtifactError
from v4c.runtime.generate import generate

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-v4"
PROMPT = list(range(3, 70, 3))


def _build(tmp: Path, source: str, target: str, edit=lambda text: text) -> Path:
    text = edit((EXAMPLE / source).read_text()).replace("target: torch", f"target: {target}")
    text = text.replace("./checkpoint", str(EXAMPLE / "checkpoint")).replace("./data", str(EXAMPLE / "data"))
    text = text.split("calibration:")[0]  # the report is not what these tests look at
    yaml = tmp / f"{Path(source).stem}-{target}.yaml"
    yaml.write_text(text)
    out = tmp / yaml.stem
    compile_model(yaml, out)
    return out


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tvm")
    return {(src, tgt): _build(tmp, src, tgt) for src in ("model.yaml", "model-fp8.yaml") for tgt in ("torch", "tvm")}


def test_the_artifact_carries_one_library_and_its_step_table(builds):
    art = builds[("model-fp8.yaml", "tvm")]
    manifest = json.loads((art / "manifest.json").read_text())
    spec = json.loads((art / "kernels/tvm/kernels.json").read_text())
    assert {"kernels/tvm/kernels.so", "kernels/tvm/kernels.json"} <= set(manifest["files"])
    assert manifest["target"]["name"] == "tvm" and manifest["target"]["toolchain"]["tvm"] == spec["tvm"]
    assert manifest["target"]["tvm"]["triple"] == spec["triple"] and spec["triple"].startswith(spec["machine"])
    assert spec["machine"] and spec["target"]["kind"] == "llvm" and spec["cpu_features"]
    program = json.loads((art / "program.json").read_text())
    gemm_steps = [i for i, s in enumerate(program["steps"]) if s["kernel"] in ("linear_fp8", "grouped_linear_fp8")]
    assert gemm_steps and all(str(i) in spec["steps"] for i in gemm_steps)


@pytest.mark.parametrize("source, tol", [("model.yaml", 1e-5), ("model-fp8.yaml", 2e-2)])
def test_tvm_matches_the_torch_target_on_the_example(builds, source, tol):
    ref, ours = open_artifact(builds[(source, "torch")]), open_artifact(builds[(source, "tvm")])
    ids = torch.tensor([PROMPT])
    a, b = ref.session().forward(ids), ours.session().forward(ids)  # one prefill
    assert rel_err(b, a) <= tol
    s_ref, s_ours = ref.session(), ours.session()
    s_ref.forward(ids[:, :-5]), s_ours.forward(ids[:, :-5])
    for t in range(5):  # decode, one token at a time (the 1-token kernels)
        x = ids[:, -5 + t:][:, :1]
        assert rel_err(s_ours.forward(x), s_ref.forward(x)) <= tol
    assert list(generate(ours.session(), PROMPT, 24)) == list(generate(ref.session(), PROMPT, 24))


def test_the_kernel_report_names_the_steps_that_ran_as_torch(builds):
    session = open_artifact(builds[("model-fp8.yaml", "tvm")]).session()
    report = session.kernels.report()
    assert report["kernels"] == "tvm" and report["steps"]["tvm"] > 0
    assert all(f["reason"] for f in report["fallbacks"])
    assert sum(report["torch_steps_by_op"].values()) == report["steps"]["torch"]


def test_a_library_for_other_cpu_features_is_refused(builds, monkeypatch):
    art = open_artifact(builds[("model.yaml", "tvm")])
    spec = json.loads((builds[("model.yaml", "tvm")] / "kernels/tvm/kernels.json").read_text())
    lacking = set(tvm_kernels.cpu_features()) - {spec["cpu_features"][-1]}
    monkeypatch.setattr(tvm_kernels, "cpu_features", lambda: lacking)
    with pytest.raises(ArtifactError, match=f"lacks \\({spec['cpu_features'][-1]}\\).*rebuild"):
        art.session()
    assert art.session(kernels="torch").kernels.name == "torch"  # the reference kernels still run it


def test_a_library_for_another_architecture_is_refused():
    with pytest.raises(ArtifactError, match="compiled for riscv64"):
        tvm_kernels.check_machine({"machine": "riscv64"}, "x")


BLOCKED = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tvm" or name.startswith(("tvm.", "v4c.targets", "v4c.passes", "v4c.ir", "v4c.frontend")):
            raise ImportError("blocked in this test: " + name)
sys.meta_path.insert(0, Block())
from v4c.runtime.artifact import open_artifact
from v4c.runtime.generate import generate
session = open_artifact(sys.argv[1]).session()
print(list(generate(session, [3, 6, 9], 8)), session.kernels.report()["steps"]["tvm"])
"""


def test_the_runtime_runs_a_tvm_artifact_where_tvm_cannot_be_imported(builds):
    art = builds[("model-fp8.yaml", "tvm")]
    proc = subprocess.run([sys.executable, "-c", BLOCKED, str(art)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    tokens, steps = proc.stdout.strip().rsplit(" ", 1)
    assert int(steps) > 0
    assert json.loads(tokens) == list(generate(open_artifact(builds[("model-fp8.yaml", "torch")]).session(), [3, 6, 9], 8))


def test_compiled_experts_match_the_reference_kernel_on_the_same_inputs(builds):
    """The routed experts through the compiled projections against moe_experts_q, identical inputs:
    only fp32 summation order differs (bound 1e-5 x max|out|)."""
    from v4c.runtime.kernels import KERNELS
    art = open_artifact(builds[("model-fp8.yaml", "tvm")])
    session = art.session()
    spec = json.loads((builds[("model-fp8.yaml", "tvm")] / "kernels/tvm/kernels.json").read_text())
    index = next(int(i) for i, e in spec["steps"].items() if e["call"] == "experts")
    step = art.program.steps[index]
    weights = [art.weights()[a[1:]] for a in step.inputs[3:]]
    experts, k = weights[0].shape[0], art.config.num_experts_per_tok
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, art.config.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(18)]).view(2, 9, k)
    w = torch.rand(2, 9, k, generator=g)
    ours = session.kernels.resolve(index, step)(x, w, idx, *weights, **step.attrs)
    ref = KERNELS[step.kernel](x, w, idx, *weights, **step.attrs)
    assert rel_err(ours, ref) <= 1e-5


def test_every_op_is_compiled(builds):
    """The decode and prefill loops run compiled kernels only (no op of the FP8 recipe is left to torch),
    and the routed experts have the fused few-token kernel."""
    art = builds[("model-fp8.yaml", "tvm")]
    spec = json.loads((art / "kernels/tvm/kernels.json").read_text())
    program = json.loads((art / "program.json").read_text())
    ops = {s["kernel"] for s in program["steps"]} - {"reshape"}
    compiled = {program["steps"][int(i)]["kernel"] for i in spec["steps"]}
    assert {"attention", "index_topk", "route_topk", "route_hash", "rms_norm", "rope", "hc_pre", "hc_post",
            "hc_head", "moe_experts_q", "linear_fp8"} <= compiled
    assert ops == compiled and spec["torch_ops"] == {}
    assert open_artifact(art).session().kernels.report()["steps"]["torch"] == 0
    assert all(e.get("fused") for e in spec["steps"].values() if e["call"] == "experts")


def test_planned_and_step_by_step_execution_agree(builds):
    """The flat call list (bound kernels writing into the arena) and the step-by-step path (each kernel
    allocating its outputs, as an observer sees them) run the same compiled functions: equal logits."""
    art = open_artifact(builds[("model-fp8.yaml", "tvm")])
    planned, stepwise = art.session(), art.session()
    seen = []
    ids = torch.tensor([PROMPT])
    a = planned.forward(ids[:, :-3])
    b = stepwise.forward(ids[:, :-3], observer=lambda i, step, ins, outs: seen.append(step.kernel))
    assert torch.equal(a, b) and "attention" in seen
    for t in range(3):
        x = ids[:, -3 + t:][:, :1]
        assert torch.equal(planned.forward(x), stepwise.forward(x, observer=lambda *_: None))


def test_fp4_experts_run_compiled_and_match_the_torch_target(tmp_path):
    """FP4 e2m1 experts (the grouped path: the compiled FP4 GEMV per expert; no fused kernel yet)."""
    arts = {t: _build(tmp_path, "model-fp8.yaml", t, lambda text: text.replace("experts: fp8", "experts: fp4"))
            for t in ("torch", "tvm")}
    spec = json.loads((arts["tvm"] / "kernels/tvm/kernels.json").read_text())
    experts = [e for e in spec["steps"].values() if e["call"] == "experts"]
    assert experts and "moe_experts_q" not in spec["torch_ops"]
    ref, ours = (open_artifact(arts[t]) for t in ("torch", "tvm"))
    ids = torch.tensor([PROMPT])
    assert rel_err(ours.session().forward(ids), ref.session().forward(ids)) <= 2e-2
    assert list(generate(ours.session(), PROMPT, 16)) == list(generate(ref.session(), PROMPT, 16))


def test_a_fused_build_is_unfused_and_runs_as_the_plain_build(builds, tmp_path):
    """The TVM kernels take float inputs and quantize them in a stage of their own, so the lowering undoes the fuse
    pass (rms_norm_quant back to rms_norm, its readers back to the norm's output) and says so: every step of the
    plain FP8 build compiles here too, and the logits are the plain TVM build's bit for bit."""
    art = _build(tmp_path, "model-fp8.yaml", "tvm", lambda text: text.replace("\nkv:", "\n  - fuse\nkv:", 1))
    spec = json.loads((art / "kernels/tvm/kernels.json").read_text())
    plain = json.loads((builds[("model-fp8.yaml", "tvm")] / "kernels/tvm/kernels.json").read_text())
    kinds = [[s["kernel"] for s in json.loads((a / "program.json").read_text())["steps"]]
             for a in (art, builds[("model-fp8.yaml", "tvm")])]
    assert kinds[0] == kinds[1] and spec["unfused_ops"] >= 3  # every layer's three norms, and more
    assert spec["torch_ops"] == plain["torch_ops"] and spec["steps"].keys() == plain["steps"].keys()
    ids = torch.tensor([PROMPT])
    ours = open_artifact(art).session()
    ref = open_artifact(builds[("model-fp8.yaml", "tvm")]).session()
    assert torch.equal(ours.forward(ids), ref.forward(ids))
    assert torch.equal(ours.forward(ids[:, :1]), ref.forward(ids[:, :1]))  # a decode step

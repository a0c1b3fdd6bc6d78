"""The triton target end to end under TRITON_INTERPRET=1 (set by conftest): artifacts carry the
kernel package and launch configs; the runtime runs them and matches the torch target; fallbacks
and refusals are reported, never silent; tuning records what it measured.

Tolerances: an fp32 build differs from the torch target only by fp32 summation order inside the
kernels (1e-5 x max|logit|; measured ~5e-7). An FP8 build quantizes activations on the fly, so a
summation-order difference of one ulp can move a value across an e4m3 rounding boundary (a 1/16
relative step of that element) and propagate: there the bound is 2e-2 x max|logit| and the same
greedy continuation; every kernel on identical inputs is held to the tight bound in the per-kernel
test files.
"""

import ast
import json
import os

import pytest
import torch
from click.testing import CliRunner
from triton.runtime.errors import OutOfResources

from conftest import rel_err, tokens
from v4c.cli import main
from v4c.frontend import import_checkpoint
from v4c.pipeline import run_pipeline
from v4c.runtime.artifact import open_artifact, pack_artifact
from v4c.runtime.errors import ArtifactError
from v4c.runtime.kernelset import KernelError
from v4c.targets.triton import compress_pair, norm_gemm, siblings
from v4c.targets.triton.configs import heuristic
from v4c.targets.triton.kernels import LAUNCHERS
from v4c.targets.triton.tune import tune_module

NAME = "hc4_mixed"  # CSA, sliding and HCA layers; hash and top-k MoE; hc_mult 4
FP8 = ("  - fp8:\n      weights: {block: [32, 32], scale_format: ue8m0}\n      experts: fp4\n"
       "      activations: {mode: dynamic, group: 16}\n      kv: fp8\n      indexer: fp4\n      skip: []\n")


def _compile(root, ckpt, target: str, passes: str = "", name: str = "art"):
    yaml = root / f"{name}.yaml"
    yaml.write_text(f"model:\n  checkpoint: {ckpt}\ntarget: {target}\npasses:\n{passes or '  []'}\n"
                    "kv:\n  max_context: 48\n  prefill_chunk: 16\n")
    result = CliRunner().invoke(main, ["compile", str(yaml), "-o", str(root / name), "-q"])
    assert result.exit_code == 0, result.output
    return root / name


@pytest.fixture(scope="module")
def builds(tmp_path_factory, hf_checkpoints):
    root, ckpt = tmp_path_factory.mktemp("triton"), hf_checkpoints[NAME]
    return {"f32": _compile(root, ckpt, "triton", name="f32"),
            "fp8": _compile(root, ckpt, "triton", FP8, name="fp8"),
            "fp8_fused": _compile(root, ckpt, "triton", FP8 + "  - fuse\n", name="fp8_fused"),
            "fp8_torch": _compile(root, ckpt, "torch", FP8, name="fp8_torch")}


def _run(session, ids, chunk):
    return torch.cat([session.forward(ids[:, i:i + chunk]) for i in range(0, ids.shape[1], chunk)], dim=1)


def test_the_artifact_carries_the_kernel_package_and_its_launch_configs(builds):
    art = builds["fp8"]
    manifest = json.loads((art / "manifest.json").read_text())
    kernels = sorted(p.name for p in (art / "kernels" / "triton").iterdir())
    assert {"__init__.py", "common.py", "gemm.py", "attention.py", "launch.json"} <= set(kernels)
    assert all(f"kernels/triton/{k}" in manifest["files"] for k in kernels)  # hashed like every other file
    launch = json.loads((art / "kernels" / "triton" / "launch.json").read_text())
    program = json.loads((art / "program.json").read_text())
    ops = {s["kernel"] for s in program["steps"]} - {"reshape"}
    assert set(launch["triton_ops"]) == ops and launch["torch_ops"] == {}  # every op of this build has a kernel
    assert {"linear_fp8", "moe_experts_q", "attention", "index_topk", "compress", "hc_pre"} <= ops
    assert manifest["target"]["toolchain"]["triton"] == launch["triton"]
    assert launch["tuning"] == {"tuned": False, "reason": "no CUDA GPU at compile time: launch configs are the "
                                                          "heuristics of targets/triton/configs.py"}
    for i, step in enumerate(program["steps"]):
        if step["kernel"] in LAUNCHERS:
            assert launch["steps"][str(i)] == heuristic(step["kernel"], step.get("attrs"))


def _prefill_then_decode(session, ids, prefill: int):
    return torch.cat([session.forward(ids[:, :prefill])] +
                     [session.forward(ids[:, i:i + 1]) for i in range(prefill, ids.shape[1])], dim=1)


def test_fp32_build_matches_the_torch_kernels(builds):
    art = open_artifact(builds["f32"])
    ids = tokens(1, 20, seed=3)  # a full 16-token chunk, then 4 decode steps
    ours = _prefill_then_decode(art.session(), ids, 16)
    ref = _prefill_then_decode(art.session(kernels="torch"), ids, 16)
    assert rel_err(ours, ref) <= 1e-5
    assert art.session().kernels.report()["steps"]["torch"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [16, 5, 1])
def test_fp32_build_matches_the_torch_kernels_to_the_planned_context(builds, chunk):
    art = open_artifact(builds["f32"])
    ids = tokens(2, 48, seed=3)  # batch 2, up to max_context: the sliding ring wraps, HCA windows close
    ours = _run(art.session(batch=2), ids, chunk)
    ref = _run(art.session(batch=2, kernels="torch"), ids, chunk)
    assert rel_err(ours, ref) <= 1e-5


def test_fp8_build_matches_the_torch_target(builds):
    ids = tokens(1, 19, seed=4)
    ours = _prefill_then_decode(open_artifact(builds["fp8"]).session(), ids, 16)
    ref = _prefill_then_decode(open_artifact(builds["fp8_torch"]).session(), ids, 16)
    assert rel_err(ours, ref) <= 2e-2
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.slow  # 40-100 s of artifacts under the interpreter; make test-all
def test_joined_sibling_projections_change_no_number(builds, hf_checkpoints, tmp_path, monkeypatch):
    """The target joins projections of one input into one GEMM launch (siblings.py); the logits are those of a
    build without the rewrite, bit for bit (the same tiles: one BLOCK_N per bucket, no split-K in the
    interpreter)."""
    kernels = json.loads((builds["fp8_fused"] / "manifest.json").read_text())["target"]["kernels"]
    joined = kernels["joined_siblings"]
    steps = json.loads((builds["fp8_fused"] / "program.json").read_text())["steps"]
    cats = [s for s in steps if s["kernel"] in ("linear_cat", "linear_fp8_cat")
            or (s["kernel"] == "norm_linear_fp8" and "sizes" in s["attrs"])]  # (siblings reading a norm: norm_gemm)
    assert joined["launches"] == len(cats) > 0 and joined["saved"] >= len(cats)
    assert all("+" in s["inputs"][1 + (s["kernel"] == "norm_linear_fp8")] for s in cats)  # the joined weights
    monkeypatch.setattr(siblings, "join", lambda m: (m, {"launches": 0, "saved": 0}))
    plain = _compile(tmp_path, hf_checkpoints[NAME], "triton", FP8 + "  - fuse\n", name="plain")
    plain_steps = json.loads((plain / "program.json").read_text())["steps"]
    normed = json.loads((plain / "manifest.json").read_text())["target"]["kernels"]["norms_in_gemms"]
    assert normed < kernels["norms_in_gemms"]  # (a norm read by two siblings folds only once they are one op)
    assert len(plain_steps) == len(steps) + joined["saved"] + kernels["norms_in_gemms"] - normed
    ids = tokens(1, 19, seed=4)
    ours = _prefill_then_decode(open_artifact(builds["fp8_fused"]).session(), ids, 16)
    assert torch.equal(ours, _prefill_then_decode(open_artifact(plain).session(), ids, 16))


@pytest.mark.slow  # 40-100 s of artifacts under the interpreter; make test-all
def test_fused_norm_quantization_changes_no_number(builds):
    """The fuse pass's build (rms_norm_quant, GEMMs and routed experts reading e4m3 codes) gives the unfused
    build's logits bit for bit: the norm kernel's codes and scales are those each GEMM computed from the norm's
    output."""
    program = json.loads((builds["fp8_fused"] / "program.json").read_text())
    fused = [s for s in program["steps"] if s["kernel"] in ("rms_norm_quant", "norm_linear_fp8")]  # (norm_gemm.py)
    readers = sum(len(s["attrs"].get("sizes", [0])) for s in program["steps"]  # (a linear_fp8_cat: its siblings)
                  if s["kernel"] == "norm_linear_fp8"
                  or (s["kernel"] in ("linear_fp8", "linear_fp8_cat") and len(s["inputs"]) == 4))
    assert len(fused) >= 3 and readers > len(fused)  # some norms feed several projections
    experts = [s for s in program["steps"] if s["kernel"] == "moe_experts_q"]
    assert experts and all(len(s["inputs"]) == 8 for s in experts)  # every layer's experts read codes
    ids = tokens(1, 19, seed=4)
    art = open_artifact(builds["fp8_fused"])
    ours = _prefill_then_decode(art.session(), ids, 16)
    assert art.session().kernels.report()["steps"]["torch"] == 0
    assert torch.equal(ours, _prefill_then_decode(open_artifact(builds["fp8"]).session(), ids, 16))


@pytest.mark.slow  # 40-100 s of artifacts under the interpreter; make test-all
def test_norms_folded_into_their_projections_change_no_number(builds, hf_checkpoints, tmp_path, monkeypatch):
    """The target folds an rms_norm_quant read by one FP8 projection into it (norm_gemm.py: norm_linear_fp8, the
    rms_norm_quant step gone); the logits are those of a build without the rewrite, bit for bit, in the prefill
    (16 rows: the GEMM norms its tiles) and the decode steps."""
    normed = json.loads((builds["fp8_fused"] / "manifest.json").read_text())["target"]["kernels"]["norms_in_gemms"]
    steps = json.loads((builds["fp8_fused"] / "program.json").read_text())["steps"]
    folded = [s for s in steps if s["kernel"] == "norm_linear_fp8"]
    assert len(folded) == normed > 0 and all(len(s["inputs"]) == 4 and "eps" in s["attrs"] for s in folded)
    monkeypatch.setattr(norm_gemm, "fold", lambda m: (m, 0))
    plain = _compile(tmp_path, hf_checkpoints[NAME], "triton", FP8 + "  - fuse\n", name="plain")
    plain_steps = json.loads((plain / "program.json").read_text())["steps"]
    assert len(plain_steps) == len(steps) + normed
    assert sum(s["kernel"] == "rms_norm_quant" for s in plain_steps) == \
        sum(s["kernel"] == "rms_norm_quant" for s in steps) + normed
    ids = tokens(1, 19, seed=4)
    ours = _prefill_then_decode(open_artifact(builds["fp8_fused"]).session(), ids, 16)
    assert torch.equal(ours, _prefill_then_decode(open_artifact(plain).session(), ids, 16))


@pytest.mark.slow  # 40-100 s of artifacts under the interpreter; make test-all
def test_compressor_pairs_change_no_number(builds, hf_checkpoints, tmp_path, monkeypatch):
    """The target joins a CSA layer's two compressors (compress_pair.py): each pair one step with both ops'
    attributes and state, the HCA compressors alone; the logits are those of a build without the rewrite, bit for
    bit (eager decode: the two compress calls; the one-launch path is tests/test_triton_graphs.py's)."""
    paired = json.loads((builds["fp8"] / "manifest.json").read_text())["target"]["kernels"]["compressor_pairs"]
    steps = json.loads((builds["fp8"] / "program.json").read_text())["steps"]
    pairs = [s for s in steps if s["kernel"] == "compress_pair"]
    assert len(pairs) == paired > 0
    for s in pairs:  # the KV entries (fp8_split) and the indexer's keys (fp4), rate 4, overlap
        first, second = s["attrs"]["first"], s["attrs"]["second"]
        assert first["rate"] == second["rate"] == 4 and first["overlap"] and second["overlap"] and len(s["state"]) == 10
        assert (first["kv_format"], second["kv_format"]) == ("fp8_split", "fp4_block")
    monkeypatch.setattr(compress_pair, "join", lambda m: (m, 0))
    plain = _compile(tmp_path, hf_checkpoints[NAME], "triton", FP8, name="plain")
    plain_steps = json.loads((plain / "program.json").read_text())["steps"]
    assert len(plain_steps) == len(steps) + paired
    assert sum(s["kernel"] == "compress" for s in plain_steps) == sum(s["kernel"] == "compress" for s in steps) \
        + 2 * paired
    ids = tokens(1, 19, seed=4)
    ours = _prefill_then_decode(open_artifact(builds["fp8"]).session(), ids, 16)
    assert torch.equal(ours, _prefill_then_decode(open_artifact(plain).session(), ids, 16))
    session = open_artifact(builds["fp8"]).session()
    session.forward(ids[:, :9])
    exported = session.export_state()  # both ops' entries, trimmed to the 2 rows written (the executor's rates)
    assert all(exported[s["state"][4]].shape[1] == exported[s["state"][9]].shape[1] == 2 for s in pairs)


def test_generate_reports_where_the_steps_ran(builds):
    args = ["generate", str(builds["fp8"]), "--token-ids", "5,6,7,8,9", "--max-new-tokens", "4", "--json"]
    ours = CliRunner().invoke(main, args)
    ref = CliRunner().invoke(main, ["generate", str(builds["fp8_torch"]), *args[2:]])
    assert ours.exit_code == 0 and ref.exit_code == 0, ours.output + ref.output
    payload = json.loads(ours.output)
    assert payload["token_ids"] == json.loads(ref.output)["token_ids"]
    steps = payload["kernels"]["steps"]
    assert payload["kernels"]["kernels"] == "triton" and steps["torch"] == 0 and steps["triton"] > 0
    assert payload["kernels"]["fallbacks"] == [] and steps["views"] > 0


def test_a_packed_artifact_runs_its_kernels(builds, tmp_path):
    packed = tmp_path / "model.v4c"
    pack_artifact(builds["f32"], packed)
    ids = tokens(1, 9, seed=5)
    ours = open_artifact(packed).session().forward(ids)
    assert rel_err(ours, open_artifact(builds["f32"]).session(kernels="torch").forward(ids)) <= 1e-5


def test_the_recorded_configs_reach_the_launchers(builds, monkeypatch):
    art = open_artifact(builds["f32"])
    session = art.session()
    seen = []
    for fn, *_ in session._steps:
        if getattr(fn, "kernel", None) == "linear":
            launcher = fn.launcher
            fn.launcher = lambda *a, _l=launcher, **kw: seen.append(kw["config"]) or _l(*a, **kw)
    session.forward(tokens(1, 17, seed=1))  # a 16-token chunk (decode bucket) and a 1-token one
    assert seen and all(c == heuristic("linear")[0]["config"] for c in seen)
    assert all(c["BLOCK_M"] == 16 for c in seen)


@pytest.mark.slow  # two FP8 artifacts under the interpreter: make test-all
def test_a_build_whose_fp8_gemms_are_warp_specialized_gives_the_same_logits(tmp_path, monkeypatch):
    """An artifact whose FP8 GEMM steps carry WARP_SPEC configs, persistent or not (set by hand: the tuner no longer times them),
    runs them, strict (no launcher refuses its inputs: the fused recipe's codes, joined siblings, the norm folds,
    grouped o_a, the runtime's planned buffers), and gives, bit for bit, the logits of the same build with the
    pointer loop at the same tiles. The fixtures' odd sizes have K that no 32-wide K tile divides (WARP_SPEC refuses
    those), so this model's projections are all 32 or 64 wide."""
    from oracle import _cfg, make_model, save_hf

    from v4c.targets.triton import configs
    ckpt = save_hf(make_model(_cfg("csh", "HTT", hidden_size=64, q_lora_rank=32, o_lora_rank=32,
                                   moe_intermediate_size=32, index_head_dim=32), seed=21), tmp_path / "ckpt")
    fp8 = FP8.replace("group: 16", "group: 32") + "  - fuse\n"  # (K tiles of 32: the fp8 dot, which WARP_SPEC needs)
    logits = {}
    for ws in (False, True, "persistent"):  # (no split-K in the interpreter: the persistent grid's tiles are the same)
        gemm = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "QUANT_ONCE": True, "WARP_SPEC": bool(ws),
                "PERSISTENT": ws == "persistent"}
        for bucket in ("decode", "prefill"):
            monkeypatch.setitem(configs._GEMM, bucket, gemm)
        art = _compile(tmp_path, ckpt, "triton", fp8, name=f"ws_{ws}")
        launch = json.loads((art / "kernels" / "triton" / "launch.json").read_text())
        program = json.loads((art / "program.json").read_text())
        fp8_steps = [i for i, st in enumerate(program["steps"]) if st["kernel"] in configs.FP8_GEMMS]
        assert {program["steps"][i]["kernel"] for i in fp8_steps} == {"linear_fp8", "linear_fp8_cat", "norm_linear_fp8",
                                                                      "grouped_linear_fp8"}
        assert all(b["config"] == gemm for i in fp8_steps for b in launch["steps"][str(i)])
        ids = tokens(1, 19, seed=4)
        logits[ws] = _prefill_then_decode(open_artifact(art).session(strict=True), ids, 16)
    assert torch.equal(logits[True], logits[False]) and torch.equal(logits["persistent"], logits[False])


def test_ops_without_a_triton_kernel_are_reported_and_strict_refuses_them(tmp_path, hf_checkpoints):
    art = _compile(tmp_path, hf_checkpoints[NAME], "triton", FP8.replace("skip: []", "skip: []\n      fake_quant: true"))
    launch = json.loads((art / "kernels" / "triton" / "launch.json").read_text())
    assert "fake_quant" in launch["torch_ops"]
    session = open_artifact(art).session()
    report = session.kernels.report()
    assert report["steps"]["torch"] > 0 and {f["kernel"] for f in report["fallbacks"]} == {"fake_quant"}
    assert "fake_quant: true" in report["fallbacks"][0]["reason"]
    with pytest.raises(KernelError, match=r"step \d+ \(fake_quant\).*strict: no fallback"):
        open_artifact(art).session(strict=True)


@pytest.mark.parametrize("into", [True, False], ids=["launcher-with-into", "launcher-without-into"])
def test_a_launcher_that_refuses_its_inputs_falls_back_reported_or_fails_strict(builds, into):
    """Bound to its planned buffer (a launcher with `into`) or not, a refusing launcher's step runs as the torch
    kernel, whose result lands in the buffer."""
    art = open_artifact(builds["f32"])
    ids = tokens(1, 6, seed=2)
    ref = art.session(kernels="torch").forward(ids)

    def refuse_into(*args, into=None, **kwargs):
        raise ValueError("x: this GPU has no such thing")

    def refuse_plain(*args, **kwargs):
        raise ValueError("x: this GPU has no such thing")
    refuse = refuse_into if into else refuse_plain

    session = art.session()
    victim = next(fn for fn, *_ in session._steps if getattr(fn, "kernel", None) == "rms_norm")
    victim.launcher = refuse
    with pytest.warns(RuntimeWarning, match="runs as the torch kernel: the triton launcher refused"):
        out = session.forward(ids)
    assert rel_err(out, ref) <= 1e-5
    report = session.kernels.report()
    assert report["fallbacks"] == [{"step": victim.index, "kernel": "rms_norm",
                                    "reason": "the triton launcher refused its inputs: x: this GPU has no such thing"}]
    strict = art.session(strict=True)
    next(fn for fn, *_ in strict._steps if getattr(fn, "kernel", None) == "rms_norm").launcher = refuse
    with pytest.raises(KernelError, match="rms_norm.*no such thing.*strict"):
        strict.forward(ids)


def test_without_a_gpu_or_the_interpreter_the_error_says_what_to_do(builds, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ArtifactError, match="need a CUDA GPU.*TRITON_INTERPRET=1.*--kernels torch"):
        open_artifact(builds["f32"]).session()
    open_artifact(builds["f32"]).session(kernels="torch").forward(tokens(1, 3))  # the reference kernels still run
    result = CliRunner().invoke(main, ["generate", str(builds["f32"]), "--token-ids", "1,2", "--max-new-tokens", "1"])
    assert result.exit_code == 2 and "need a CUDA GPU" in result.output and "Traceback" not in result.output


def test_a_different_triton_version_is_a_note(builds, tmp_path):
    import shutil
    copy = tmp_path / "art"
    shutil.copytree(builds["f32"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target"]["toolchain"]["triton"] = "0.0.1"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(RuntimeWarning, match="compiled and tuned with triton 0.0.1"):
        session = open_artifact(copy).session()
    assert "0.0.1" in session.kernels.report()["notes"][0]


def test_tuning_keeps_the_fastest_config_for_every_step_of_a_signature(hf_checkpoints, monkeypatch):
    import v4c.targets.triton.tune as tune
    grid = {"decode": [{"BLOCK_M": 16, "BLOCK_N": n} for n in (32, 128, 64)],
            "prefill": [{"BLOCK_M": 16, "BLOCK_N": n} for n in (256, 32)]
            + [{"BLOCK_M": 3},  # refused by the launcher
               {"BLOCK_M": 16, "BLOCK_N": 1024}]}  # "too much shared memory" (raised below, as a GPU would)
    monkeypatch.setattr(tune, "candidates", lambda op, bucket, attrs=None: grid[bucket] if op == "linear" else [])
    module, _ = import_checkpoint(hf_checkpoints[NAME], max_context=48)
    module = run_pipeline(module, [])
    steps = {str(i): heuristic(ins.op) for i, ins in enumerate(module.func.body) if ins.op in LAUNCHERS}
    timed = []

    def timer(fn):  # a stand-in clock: wider N tiles are "faster"; every candidate is still run
        timed.append(fn())
        return 1.0 / timed_config[0].get("BLOCK_N", 1)

    timed_config = [{}]

    def launch(*a, **kw):
        timed_config[0] = kw["config"]
        if kw["config"].get("BLOCK_N") == 1024:
            raise OutOfResources(237568, 232448, "shared memory")
        return LAUNCHERS["linear"](*a, **kw)
    launchers = {"linear": launch}
    record = tune_module(module, launchers, steps, prefill_chunk=16, decode_batch=2, device="cpu", timer=timer)
    linear = [i for i, ins in enumerate(module.func.body) if ins.op == "linear"]
    assert record["tuned"] and {r["op"] for r in record["signatures"]} == {"linear"}
    assert sorted(i for r in record["signatures"] if r["bucket"] == "decode" for i in r["steps"]) == linear
    for i in linear:
        assert [b["source"] for b in steps[str(i)]] == ["tuned", "tuned"]
        assert [b["config"]["BLOCK_N"] for b in steps[str(i)]] == [128, 256]
    assert all(r["ms"] is not None for r in record["signatures"])
    assert {(r["bucket"], r["tried"], r["rejected"]) for r in record["signatures"]} == {("decode", 3, 0),
                                                                                       ("prefill", 4, 2)}


def test_tuning_skips_a_candidate_whose_result_is_wrong(hf_checkpoints, monkeypatch):
    """A projection candidate whose result is not the first config's up to summation order (here: a config whose
    launch returns its result off by 1%, as a miscompiled code path would) is never chosen, however fast, and is
    counted ("wrong"); one that differs by fp32 rounding only is timed as any other."""
    import v4c.targets.triton.tune as tune
    grid = [{"BLOCK_M": 16, "BLOCK_N": 32}, {"BLOCK_M": 16, "BLOCK_N": 256}, {"BLOCK_M": 16, "BLOCK_N": 64}]
    monkeypatch.setattr(tune, "candidates", lambda op, bucket, attrs=None: grid if op == "linear" else [])
    module, _ = import_checkpoint(hf_checkpoints[NAME], max_context=48)
    module = run_pipeline(module, [])
    steps = {str(i): heuristic(ins.op) for i, ins in enumerate(module.func.body) if ins.op in LAUNCHERS}
    config = [{}]

    def launch(*a, **kw):
        config[0] = kw["config"]
        y = LAUNCHERS["linear"](*a, **kw)
        if kw["config"]["BLOCK_N"] == 256:
            return y * 1.01
        return y * (1 + 1e-6) if kw["config"]["BLOCK_N"] == 64 else y

    record = tune_module(module, {"linear": launch}, steps, prefill_chunk=16, decode_batch=2, device="cpu",
                         timer=lambda fn: (fn(), 1.0 / config[0]["BLOCK_N"])[1])
    assert {(r["tried"], r["rejected"], r["wrong"]) for r in record["signatures"]} == {(3, 0, 1)}
    assert {r["config"]["BLOCK_N"] for r in record["signatures"]} == {64}
    assert not tune._agrees(torch.tensor([1.0, float("nan")]), [torch.tensor([1.0, 2.0])], 1e-3)
    assert tune._agrees(torch.tensor([1.0, 2.001]), [torch.tensor([1.0, 2.0])], 1e-3)
    assert tune.RESULT_RTOL["experts"] > tune.RESULT_RTOL["gemm"] and "attention" not in tune.RESULT_RTOL


def test_the_kernel_package_imports_only_torch_triton_and_itself():
    root = os.path.join(os.path.dirname(LAUNCHERS["linear"].__code__.co_filename))
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(root, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [] if node.level else [node.module.split(".")[0]]
            else:
                continue
            assert set(mods) <= {"torch", "triton", "math", "importlib"}, (name, mods)


def test_tune_on_without_a_gpu_is_an_error(tmp_path, hf_checkpoints):
    yaml = tmp_path / "m.yaml"
    yaml.write_text(f"model:\n  checkpoint: {hf_checkpoints[NAME]}\ntarget: triton\ntune: on\n")
    result = CliRunner().invoke(main, ["compile", str(yaml), "-o", str(tmp_path / "a")])
    assert result.exit_code == 2 and "tune: on needs a CUDA GPU" in result.output
    assert not (tmp_path / "a").exists()


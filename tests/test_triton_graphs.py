"""Graph segments of the executor (runtime/executor.py) on a triton artifact, under TRITON_INTERPRET=1 with
CUDA-graph semantics emulated on the CPU (tests/graph_emulator.py): a segment's device work is recorded
once and replayed without its host code. Replays must give exactly the eager run's logits (the same
kernels on the same inputs: bitwise), and no segment may read a tensor value on the host.

The launchers are run as on a GPU, where they do not range-check ids on the host (common.HOST_CHECKS =
False): on the CPU they do, which would be a host read inside a segment.
"""

import sys

import pytest
import torch

from conftest import tokens
from graph_emulator import EmulatedGraphs, HostRead
from test_triton_target import FP8, NAME, _compile
from v4c.runtime.artifact import open_artifact
from v4c.runtime.errors import InputError
from v4c.runtime.executor import Session, _Segment
from v4c.runtime.kernelset import triton_kernels
from v4c.targets.triton.kernels import pairs as pairs_mod


@pytest.fixture(scope="module")
def fp8_build(tmp_path_factory, hf_checkpoints):
    return _compile(tmp_path_factory.mktemp("graphs"), hf_checkpoints[NAME], "triton", FP8, name="fp8")


@pytest.fixture(scope="module")
def fused_build(tmp_path_factory, hf_checkpoints):
    return _compile(tmp_path_factory.mktemp("graphs"), hf_checkpoints[NAME], "triton", FP8 + "  - fuse\n",
                    name="fused")


def _as_on_a_gpu(monkeypatch):
    """The artifact's kernel package (imported from its cache copy) skips host value checks."""
    for name, module in list(sys.modules.items()):
        if name.startswith("_v4c_triton_kernels_") and name.endswith(".common"):
            monkeypatch.setattr(module, "HOST_CHECKS", False)


def _session(art, graphs):
    kernels = triton_kernels(art.store, art.manifest, device="cpu")
    return Session(art.program, art.weights(), kernels=kernels, graphs=graphs)


def _graphed(art, monkeypatch):
    """-> (emulated graphs, a session replaying its segments through them), the launchers deciding as on a GPU."""
    _as_on_a_gpu(monkeypatch)
    graphs = EmulatedGraphs()
    return graphs, _session(art, graphs)


def _decode(session, ids, prefill):
    return torch.cat([session.forward(ids[:, :prefill])] +
                     [session.forward(ids[:, i:i + 1]) for i in range(prefill, ids.shape[1])], dim=1)


def test_replayed_segments_give_the_eager_logits_bit_for_bit(fp8_build, monkeypatch):
    """Decode steps 28 .. 35 (the ring of 15 wraps, CSA windows of 4 close at 31 and 35, the HCA window of 32 at
    31) replayed: a decode step is one graph, its stateful steps reading the position on the device."""
    art = open_artifact(fp8_build)
    _session(art, None)  # imports the kernel package
    _as_on_a_gpu(monkeypatch)
    ids = tokens(1, 36, seed=3)
    eager = _decode(_session(art, None), ids, 28)
    graphs = EmulatedGraphs()
    session = _session(art, graphs)
    graphed = _decode(session, ids, 28)
    assert graphs.failed == []
    assert graphs.replays >= 6 * graphs.captures > 0  # 8 decode steps: eager, capture, replays
    assert torch.equal(graphed, eager)
    report = session.graph_report()["shapes"]["1"]
    assert report["host_calls"] == report["graphs"] == 1  # the whole decode step
    assert report["entries_in_graphs"] == report["entries"] > 50
    prefill = next(plan for seq, plan in session._plans.items() if seq > 1)
    assert {label.split(":")[1] for label in prefill.labels if not label.startswith("graph")} >= {
        "attention", "compress", "index_topk"}  # prefill: the stateful steps between segments, pos0 from the host


@pytest.mark.slow  # 40-100 s of artifacts under the interpreter; make test-all
def test_a_fused_build_replays_its_norm_quantization_in_the_graph(fp8_build, fused_build, monkeypatch):
    """The fuse pass's rms_norm_quant (two results, both planned buffers: e4m3 codes and fp32 scales) joins the
    decode step's graph, and the replayed steps give the unfused build's eager logits bit for bit."""
    ids = tokens(1, 24, seed=6)
    eager = _decode(_session(open_artifact(fp8_build), None), ids, 16)
    graphs, session = _graphed(open_artifact(fused_build), monkeypatch)
    graphed = _decode(session, ids, 16)
    assert graphs.failed == [] and graphs.replays > 0
    assert torch.equal(graphed, eager)
    report = session.graph_report()["shapes"]["1"]
    assert report["host_calls"] == report["graphs"] == 1 and report["entries_in_graphs"] == report["entries"]
    art = open_artifact(fused_build)
    eager_fused = _session(art, None)
    eager_fused.forward(ids[:, :1])  # plans a decode-shaped call
    fused = sum(step.kernel == "rms_norm_quant" for step in art.program.steps)
    folded = sum(step.kernel == "norm_linear_fp8" for step in art.program.steps)  # (targets/triton/norm_gemm.py)
    labels = eager_fused._plans[1].labels  # the kernel writes both planned buffers itself: no copy after it
    assert fused >= 1 and labels.count("bound:rms_norm_quant") == fused and "py:rms_norm_quant" not in labels
    assert folded >= 2 and labels.count("bound:norm_linear_fp8") == folded  # (one result, or one per sibling)


def test_a_segment_that_reads_a_value_is_reported_and_runs_eagerly(fp8_build, monkeypatch):
    art = open_artifact(fp8_build)
    ids = tokens(1, 20, seed=4)
    eager = _decode(_session(art, None), ids, 16)
    graphs, session = _graphed(art, monkeypatch)
    session.forward(ids[:, :16])
    session.forward(ids[:, 16:17])  # plans the decode shape and warms its segments up
    segment = next(fn for fn, _, _ in session._plans[1].entries if isinstance(fn, _Segment))
    first = segment.entries[0][0]
    segment.entries[0] = (lambda *a, **k: (int(a[0].flatten()[0]), first(*a, **k)), *segment.entries[0][1:])
    out = torch.cat([session.forward(ids[:, i:i + 1]) for i in range(17, 20)], dim=1)
    assert len(graphs.failed) == 1 and "HostRead" in graphs.failed[0]
    assert torch.equal(out, eager[:, 17:])


@pytest.mark.slow  # 40-100 s of artifacts under the interpreter; make test-all
def test_a_stateful_launcher_refusing_a_device_position_falls_back_at_the_host_position(fp8_build, monkeypatch):
    """An attention launcher that refuses its device position (say, a shape it cannot serve so) falls back to the
    torch kernel, handed the position as an int: a host read, so the decode step's capture is reported and the
    step runs eagerly, with the logits of the triton run within the kernels' tolerance."""
    art = open_artifact(fp8_build)
    ids = tokens(1, 20, seed=5)
    eager = _decode(_session(art, None), ids, 16)
    graphs, session = _graphed(art, monkeypatch)
    victim = next(fn for fn, *_ in session._steps if getattr(fn, "kernel", None) == "attention")
    launcher = victim.launcher

    def refuse_on_device(*args, pos0, **kwargs):
        if isinstance(pos0, torch.Tensor):
            raise ValueError("pos0: not at a device position")
        return launcher(*args, pos0=pos0, **kwargs)
    refuse_on_device.device_position = True
    victim.launcher = refuse_on_device
    with pytest.warns(RuntimeWarning, match="runs as the torch kernel.*not at a device position"):
        graphed = _decode(session, ids, 16)
    assert len(graphs.failed) == 1 and "HostRead" in graphs.failed[0]
    assert float((graphed - eager).abs().max() / eager.abs().max()) <= 1e-5


def _tiered_build(root, ckpt, device_budget=None):
    """The FP8 triton artifact with pages of 8 tokens and, given a budget, the KV tiers planned under it."""
    from click.testing import CliRunner

    from v4c.cli import main
    name = "tiered" if device_budget else "paged"
    yaml = root / f"{name}.yaml"
    tiers = f"{{device: {device_budget}}}" if device_budget else "{}"
    yaml.write_text(f"model:\n  checkpoint: {ckpt}\ntarget: triton\npasses:\n{FP8}\n"
                    f"kv:\n  max_context: 48\n  prefill_chunk: 16\n  page_tokens: 8\n  tiers: {tiers}\n")
    result = CliRunner().invoke(main, ["compile", str(yaml), "-o", str(root / name), "-q"])
    assert result.exit_code == 0, result.output
    return open_artifact(root / name)


@pytest.mark.slow  # 40-100 s of artifacts under the interpreter; make test-all
def test_tiered_layers_stay_between_graphs_and_the_rest_replays(tmp_path, hf_checkpoints, monkeypatch):
    """With the CSA entries on the host tier (a device budget of all else plus 2 pages a CSA layer), a decode step's
    steps over tiered state keep host positions and run between graphs (with the prefetch), the other stateful
    steps replay at device positions; the logits equal the eager run's bit for bit."""
    import json

    from v4c.runtime.kv_tiers import PagedEntries
    full = _tiered_build(tmp_path, hf_checkpoints[NAME])
    plan = json.loads((full.store.root / "plans" / "kv.json").read_text())
    csa = [slot for slot in plan["slots"].values() if slot["family"] == "CSA entries"]
    budget = plan["session_bytes"] - sum(slot["bytes"] for slot in csa) + 2 * sum(
        max(1, 8 // slot["tokens_per_entry"]) * slot["entry_bytes"] for slot in csa)
    art = _tiered_build(tmp_path, hf_checkpoints[NAME], budget)
    ids = tokens(1, 40, seed=6)
    eager_session = _session(art, None)
    assert any(isinstance(t, PagedEntries) for t in eager_session.state.values())
    eager = _decode(eager_session, ids, 30)
    graphs, session = _graphed(art, monkeypatch)
    graphed = _decode(session, ids, 30)
    assert graphs.failed == [] and graphs.replays > 0
    assert torch.equal(graphed, eager)
    # outside the graphs: the CSA layer's compressor pair (its KV compressor writes the tiered entries; the indexer's
    # keys, on the device, come along at the host position: compress_pair.py), its attention (reading them) and the
    # prefetch after it; its index_topk and every other layer's replay
    outside = [label for label in session._plans[1].labels if not label.startswith("graph")]
    assert sorted(outside) == ["bound:attention", "prefetch", "py:compress_pair"]


def test_the_emulator_refuses_host_reads_and_value_dependent_shapes():
    arena = torch.zeros(4)
    x = torch.tensor([3, 1, 3])
    for bad in (lambda: int(x.max()), lambda: torch.bincount(x), lambda: x.nonzero(), lambda: x.tolist()):
        with pytest.raises(HostRead):
            EmulatedGraphs().capture(bad, arena)


def _arena_copies(session, ids) -> int:
    """Copies into the session's arena (a kernel's result copied into its planned buffer) during forward(ids),
    with the Triton launches skipped (the interpreter copies its arguments back after each launch) and so no
    host checks of the values they leave (the session's state is garbage after it)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction
    arena = session.arena.untyped_storage().data_ptr()

    class Copies(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.copy_ and args[0].untyped_storage().data_ptr() == arena:
                Copies.n += 1
            return func(*args, **(kwargs or {}))
    with pytest.MonkeyPatch.context() as patch, Copies():
        patch.setattr(InterpretedFunction, "run", lambda *args, **kwargs: None)
        _as_on_a_gpu(patch)
        session.forward(ids)
    return Copies.n


@pytest.mark.slow  # 40-100 s of artifacts under the interpreter; make test-all
def test_launchers_write_their_planned_buffers_without_a_copy(fp8_build, monkeypatch):
    """Every triton step's plan entry hands the launcher its arena buffer (`into`): a decode step copies no result,
    where the entries of launchers without `into` copy each one; the logits are the same bit for bit."""
    art = open_artifact(fp8_build)
    ids = tokens(1, 13, seed=4)
    bound = _session(art, None)
    bound.forward(ids[:, :10])
    labels = bound._plans[10].labels
    unbound = {label for label in labels if not label.startswith("bound:")}
    assert unbound == {"py:compress", "py:compress_pair"}  # (they have no result)
    assert _arena_copies(bound, ids[:, 10:11]) == 0
    monkeypatch.setattr("v4c.runtime.kernelset._parameters", lambda fn: frozenset())  # as launchers without it
    copying = _session(art, None)
    copying.forward(ids[:, :10])
    assert _arena_copies(copying, ids[:, 10:11]) >= len(labels) // 2
    want = _decode(_session(art, None), ids, 10)
    monkeypatch.undo()
    assert torch.equal(_decode(_session(art, None), ids, 10), want)


def test_graphs_need_a_cuda_device(fp8_build):
    art = open_artifact(fp8_build)
    with pytest.raises(InputError, match="CUDA graphs need a CUDA device"):
        Session(art.program, art.weights(), graphs=True)
    with pytest.raises(Exception, match="CUDA graphs need a CUDA device"):
        art.session(graphs=True)


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("pairs,experts,bm", [(1, 8, 16), (6, 64, 16), (37, 5, 4), (64, 8, 16), (200, 64, 16)])
def test_the_fixed_size_expert_tiles_cover_every_pair_once(pairs, experts, bm, path):
    """The experts' pair bookkeeping (pairs.sort_pairs; decode sizes in one kernel, more pairs with torch ops): pairs
    sorted stably by expert, each in exactly one tile of its expert, and no more working tiles than needed."""
    g = torch.Generator().manual_seed(pairs)
    flat = torch.randint(0, experts, (pairs,), generator=g)
    weights = torch.rand(pairs, generator=g)
    pairs_of = pairs_mod.sort_pairs if path == "kernel" else pairs_mod.sort_pairs_torch
    rows, pw, slot_rows, (tile_e, lo, hi) = pairs_of(flat.view(pairs, 1), weights.view(pairs, 1), experts, bm)
    assert tile_e.numel() == pairs_mod.max_tiles(pairs, experts, bm)
    order = flat.sort(stable=True).indices
    assert torch.equal(rows.long(), order) and torch.equal(pw, weights[order])  # k = 1: a pair's token is itself
    assert torch.equal(order[slot_rows.view(-1).long()], torch.arange(pairs))
    seen = torch.zeros(pairs, dtype=torch.long)
    for e, a, b in zip(tile_e.tolist(), lo.tolist(), hi.tolist()):
        rows = range(a, min(a + bm, b))
        assert all(int(flat[order[p]]) == e for p in rows)
        seen[list(rows)] += 1
    assert torch.equal(seen, torch.ones(pairs, dtype=torch.long))
    counts = torch.bincount(flat, minlength=experts)
    assert int((hi > lo).sum()) == int(((counts + bm - 1) // bm).sum())  # no more tiles than needed do work


@pytest.mark.parametrize("tokens,k,experts,bm,ids", [(1, 6, 64, 16, "distinct"), (3, 6, 256, 16, "distinct"),
                                                     (37, 2, 5, 4, "distinct"), (200, 6, 64, 64, "distinct"),
                                                     (50, 3, 300, 32, "repeats"), (1, 1, 1, 16, "distinct")])
def test_the_pairs_kernel_equals_the_torch_bookkeeping(tokens, k, experts, bm, ids):
    """_pairs_kernel (one program, a counting sort) gives exactly the torch path's rows, weights, slot rows and
    tiles: distinct experts per token (the top-k router) or repeated ones (a hash table may), bf16 weights."""
    g = torch.Generator().manual_seed(tokens * k)
    if ids == "distinct":
        idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    else:
        idx = torch.randint(0, experts, (tokens, k), generator=g)
    weights = torch.rand(tokens, k, generator=g).to(torch.bfloat16)
    assert tokens * k <= pairs_mod.PAIRS_KERNEL_MAX
    got, want = pairs_mod.sort_pairs(idx, weights, experts, bm), pairs_mod.sort_pairs_torch(idx, weights, experts, bm)
    for a, b in zip((*got[:3], *got[3]), (*want[:3], *want[3])):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_generate_with_cuda_graphs_off_a_gpu_says_why(fp8_build):
    from click.testing import CliRunner

    from v4c.cli import main
    result = CliRunner().invoke(main, ["generate", str(fp8_build), "--token-ids", "1,2", "--max-new-tokens", "1",
                                       "--cuda-graphs"])
    assert result.exit_code == 2 and "CUDA graphs need a CUDA device" in result.output

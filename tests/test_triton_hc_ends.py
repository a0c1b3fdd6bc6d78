"""The residual streams' two ends, one launch each (targets/triton/hc_ends.py), under TRITON_INTERPRET=1
(conftest): the embedding kernels store the hc streams themselves, and hc_post_head is hc_post then hc_head in one
launch, hc_post_head_norm with the final norm. Tolerances: the embedding is a gather (exact); hc_post_head(_norm)
is bit for bit the two (three) Triton launches it replaces (each K tile of the streams computed as hc_post computes
it, the row normed with the rms_norm kernel's code) and within hc_head's fp32 bound (1e-5 x max|ref|) of the torch
kernels; the rewritten artifact's logits are those of the artifact without the rewrite,
bit for bit (the same kernels compute the same values), with the Triton kernels and the torch kernels alike.
"""
import inspect
import json

import pytest
import torch

from conftest import tokens
from test_triton_gemm import fp8_weight
from test_triton_hyper import assert_close, head_params, randn
from test_triton_target import FP8, NAME, _compile, _prefill_then_decode
from v4c.frontend import import_checkpoint
from v4c.ir import Function, Instr, Value, verify
from v4c.pipeline import run_pipeline
from v4c.runtime.artifact import open_artifact
from v4c.runtime.kernels import basic, hyper as ref, quantized
from v4c.spec import PassSpec
from v4c.targets.triton import hc_ends
from v4c.targets.triton.kernels import embed as tri_embed, hyper as tri, hyper_head, norm


def test_the_launchers_take_the_reference_signatures():
    assert set(hyper_head.LAUNCHERS) == {"hc_post_head", "hc_post_head_norm"}
    for name, launcher in hyper_head.LAUNCHERS.items():
        params = dict(inspect.signature(launcher).parameters)
        assert [params.pop(k).default for k in ("config", "into")] == [None, None]
        assert list(params.values()) == list(inspect.signature(getattr(ref, name)).parameters.values())
    for name, reference in (("embed", basic.embed), ("embed_fp8", quantized.embed_fp8)):
        params = dict(inspect.signature(tri_embed.LAUNCHERS[name]).parameters)
        del params["config"], params["into"]
        assert list(params.values()) == list(inspect.signature(reference).parameters.values())


@pytest.mark.parametrize("hc", [1, 3, 4])
def test_embeddings_write_the_streams(hc):
    """embed / embed_fp8 with hc: the row hc times, equal to hc_expand of the plain embedding (both kernels and the
    references), at odd sizes and a tile smaller than the row."""
    ids = torch.randint(0, 37, (2, 5), generator=torch.Generator().manual_seed(3))
    w = randn(37, 45, seed=4)
    plain = tri_embed.embed(ids, w)
    for config in (None, {"BLOCK_T": 4, "BLOCK_D": 16}):
        ours = tri_embed.embed(ids, w, hc=hc, config=config)
        assert ours.shape == (2, 5, hc, 45) and torch.equal(ours, tri.hc_expand(plain, hc=hc))
        assert torch.equal(ours, basic.embed(ids, w, hc=hc))
    q, s = fp8_weight(37, 45, [4, 16], "ue8m0", seed=5)
    ours = tri_embed.embed_fp8(ids, q, s, block=[4, 16], hc=hc)
    assert torch.equal(ours, quantized.embed_fp8(ids, q, s, block=[4, 16], hc=hc))
    assert torch.equal(ours, tri.hc_expand(tri_embed.embed_fp8(ids, q, s, block=[4, 16]), hc=hc))
    with pytest.raises(ValueError, match="hc: expected a positive int"):
        tri_embed.embed(ids, w, hc=0)


@pytest.mark.parametrize("hc,b,s,d", [(1, 1, 1, 17), (3, 2, 3, 33), (4, 1, 2, 100)])
@pytest.mark.parametrize("split", [1, 3])
def test_hc_post_head_is_hc_post_then_hc_head(hc, b, s, d, split):
    """One launch: hc_head of hc_post's new streams, bit for bit as the two launches, with and without the
    addend, in one run a token and split over runs (whose last collapses streams the other runs stored)."""
    out, streams, addend = randn(b, s, d, seed=6), randn(b, s, hc, d, seed=7), randn(b, s, d, seed=8)
    post, comb = 2 * torch.rand(b, s, hc), torch.rand(b, s, hc, hc)
    params = head_params(hc, d, seed=9)
    kw = dict(eps=1e-6, norm_eps=1e-6)
    config = {"BLOCK_K": 16, "BLOCK_D": 16, "SPLIT_K": split}
    for extra in (None, addend):
        ours = hyper_head.hc_post_head(out, streams, post, comb, *params, extra, **kw, config=config)
        apart = tri.hc_head(tri.hc_post(out, streams, post, comb, extra), *params, **kw, config=config)
        assert ours.shape == (b, s, d) and torch.equal(ours, apart)
        assert_close(ours, ref.hc_post_head(out, streams, post, comb, *params, extra, **kw))
    empty = torch.zeros(0, s, hc, d)
    assert hyper_head.hc_post_head(empty[:, :, 0], empty, post[:0], comb[:0], *params, **kw).shape == (0, s, d)
    with pytest.raises(ValueError, match="post: expected shape"):
        hyper_head.hc_post_head(out, streams, post[..., :0], comb, *params, **kw)


@pytest.mark.parametrize("hc,b,s,d", [(1, 1, 1, 17), (3, 2, 3, 33), (4, 1, 2, 100)])
@pytest.mark.parametrize("split", [1, 3])
def test_hc_post_head_norm_is_hc_post_head_then_rms_norm(hc, b, s, d, split):
    """With the final norm: the rms_norm kernel's row of hc_post_head's result, bit for bit, with and without the
    addend, in one run a token and split (the last run to arrive norms the row); a bf16 weight; bad norm
    attributes and weights named."""
    out, streams, addend = randn(b, s, d, seed=16), randn(b, s, hc, d, seed=17), randn(b, s, d, seed=18)
    post, comb = 2 * torch.rand(b, s, hc), torch.rand(b, s, hc, hc)
    params, weight = head_params(hc, d, seed=19), (torch.rand(d) + 0.5).bfloat16()
    kw = dict(eps=1e-6, norm_eps=1e-6)
    config = {"BLOCK_K": 16, "BLOCK_D": 16, "SPLIT_K": split}
    for extra in (None, addend):
        ours = hyper_head.hc_post_head_norm(out, streams, post, comb, *params, weight, extra, **kw,
                                            norm={"eps": 1e-5}, config=config)
        head = hyper_head.hc_post_head(out, streams, post, comb, *params, extra, **kw, config=config)
        assert ours.shape == (b, s, d) and torch.equal(ours, norm.rms_norm(head, weight, eps=1e-5))
        assert_close(ours, ref.hc_post_head_norm(out, streams, post, comb, *params, weight, extra, **kw,
                                                 norm={"eps": 1e-5}))
    args = (out, streams, post, comb, *params)
    with pytest.raises(ValueError, match="norm: expected"):
        hyper_head.hc_post_head_norm(*args, weight, **kw, norm={"eps": 1e-5, "group": 4})
    with pytest.raises(ValueError, match="norm_weight: expected shape"):
        hyper_head.hc_post_head_norm(*args, weight[:-1], **kw, norm={"eps": 1e-5})


def _module(hf_checkpoints, skip=()):
    module = import_checkpoint(hf_checkpoints[NAME], max_context=64)[0]
    fp8 = {"weights": {"block": [4, 16], "scale_format": "ue8m0"}, "activations": {"mode": "dynamic", "group": 16},
           "skip": list(skip)}
    return run_pipeline(module, [PassSpec(name="fp8", options=fp8), PassSpec(name="fuse")])


def test_the_rewrite_folds_only_values_read_once(hf_checkpoints):
    """Each end folds when the embedding's rows (the last hc_post's streams) are read by hc_expand (hc_head) alone;
    another reader keeps the pair apart."""
    m = _module(hf_checkpoints)
    folded, counts = hc_ends.fold(m)
    assert counts == {"embeds": 1, "heads": 1, "norms": 0}  # the final norm is the FP8 lm_head's (norm_gemm.py)
    verify(folded)
    ops = [ins.op for ins in folded.func.body]
    assert "hc_expand" not in ops and "hc_head" not in ops and ops.count("hc_post_head") == 1
    assert folded.func.body[0].results[0].type.shape == ("B", "S", 4, 56)
    bf16_head, counts = hc_ends.fold(_module(hf_checkpoints, skip=["lm_head.weight"]))
    assert counts == {"embeds": 1, "heads": 1, "norms": 1}
    verify(bf16_head)
    last = bf16_head.func.body[-2:]
    assert [ins.op for ins in last] == ["hc_post_head_norm", "linear"]
    assert last[0].operands[7].name == "norm.weight" and last[0].attrs["norm"] == {"eps": 1e-6}
    m = _module(hf_checkpoints, skip=["lm_head.weight"])
    row = next(ins for ins in m.func.body if ins.op == "hc_head").results[0]
    body = [*m.func.body[:-1], Instr("add", [row, row], [Value("extra", row.type)], {}), m.func.body[-1]]
    assert hc_ends.fold(m.replace(func=Function(m.func.inputs, body, m.func.output)))[1]["norms"] == 0
    body = list(m.func.body)
    rows = next(ins for ins in body if ins.op == "embed_fp8").results[0]
    streams = next(ins for ins in body if ins.op == "hc_post").results[0]
    for i, value in enumerate((rows, streams)):  # a second reader of each
        body.insert(len(body) - 1, Instr("add", [value, value], [Value(f"extra{i}", value.type)], {}))
    extra, counts = hc_ends.fold(m.replace(func=Function(m.func.inputs, body, m.func.output)))
    assert counts == {"embeds": 0, "heads": 0, "norms": 0} and len(extra.func.body) == len(body)


@pytest.fixture(scope="module", params=["fp8", "f32"])
def arts(request, tmp_path_factory, hf_checkpoints):
    """(folded, plain, folds): the FP8 recipe (its lm_head FP8, the final norm in it) and no passes (a float
    lm_head: the final norm in hc_post_head_norm)."""
    root = tmp_path_factory.mktemp("ends")
    passes = FP8 + "  - fuse\n" if request.param == "fp8" else ""
    folded = _compile(root, hf_checkpoints[NAME], "triton", passes, name="folded")
    mp = pytest.MonkeyPatch()
    mp.setattr(hc_ends, "fold", lambda m: (m, {"embeds": 0, "heads": 0, "norms": 0}))
    try:
        plain = _compile(root, hf_checkpoints[NAME], "triton", passes, name="plain")
    finally:
        mp.undo()
    return folded, plain, {"embeds": 1, "heads": 1, "norms": int(request.param == "f32")}


def test_the_artifact_launches_fewer_and_computes_the_same(arts):
    folded, plain, folds = arts
    manifest = json.loads((folded / "manifest.json").read_text())
    assert manifest["target"]["kernels"]["hc_ends"] == folds
    steps = json.loads((folded / "program.json").read_text())["steps"]
    plain_steps = json.loads((plain / "program.json").read_text())["steps"]
    assert len(plain_steps) == len(steps) + sum(folds.values())
    head = "hc_post_head_norm" if folds["norms"] else "hc_post_head"
    assert [s["kernel"] for s in steps if s["kernel"].startswith(("embed", "hc_post_head"))] == \
        [plain_steps[0]["kernel"], head]
    ids = tokens(1, 19, seed=5)  # a 16-token prefill, then 3 decode steps
    for kernels in ("triton", "torch"):
        ours, base = (_prefill_then_decode(open_artifact(a).session(kernels=kernels, strict=True), ids, 16)
                      for a in (folded, plain))
        assert torch.equal(ours, base)

"""The shippable artifact: deterministic and atomic compiles, verification refusals, signatures,
packing, inspect, and the memory plan against the allocator."""

import json
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch
from click.testing import CliRunner

from conftest import tokens
from v4c.cli import main
from v4c.compile import compile_model
from v4c.frontend import CheckpointError
from v4c.runtime.artifact import open_artifact
from v4c.runtime.score import score_tokens

NAME = "hc2_yarn"


def _spec(root, ckpt, max_context=64, chunk=16):
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.yaml").write_text(f"model:\n  checkpoint: {ckpt}\nkv:\n  max_context: {max_context}\n"
                                     f"  prefill_chunk: {chunk}\n")
    return root / "model.yaml"


@pytest.fixture(scope="module")
def built(tmp_path_factory, hf_checkpoints):
    root = tmp_path_factory.mktemp("artifact")
    compile_model(_spec(root, hf_checkpoints[NAME]), root / "art")
    return root


@pytest.fixture
def art(built, tmp_path):
    """A fresh copy of the built artifact that a test may damage."""
    shutil.copytree(built / "art", tmp_path / "art")
    return tmp_path / "art"


def _files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _verify(path, *extra):
    return CliRunner().invoke(main, ["verify", str(path), *extra])


# --- determinism and atomicity ---------------------------------------------------------------------
def test_compiling_twice_gives_identical_bytes(built, tmp_path):
    compile_model(built / "model.yaml", tmp_path / "again")
    assert _files(tmp_path / "again") == _files(built / "art")


KILLER = """
import os, signal, sys
from v4c.compile import compile_model
def progress(task, done, total):
    os.kill(os.getpid(), signal.SIGKILL)  # mid-way through writing the weights
compile_model(sys.argv[1], sys.argv[2], progress=progress)
"""


def test_a_killed_compile_leaves_the_old_artifact_intact(art, built, tmp_path):
    before = _files(art)
    result = subprocess.run([sys.executable, "-c", KILLER, str(built / "model.yaml"), str(art)], timeout=300)
    assert result.returncode == -9
    assert _files(art) == before and _verify(art).exit_code == 0
    partial = list(art.parent.glob(".art.partial-*"))
    assert partial, "the kill should have happened while the partial artifact was being written"
    compile_model(built / "model.yaml", art)  # the next compile cleans up and replaces atomically
    assert not list(art.parent.glob(".art.*")) and _files(art) == before


def test_a_failed_compile_leaves_nothing(tmp_path, oracle_models):
    from oracle import save_release
    save_release(oracle_models[NAME], tmp_path / "ckpt")
    from safetensors.torch import load_file, save_file
    t = load_file(tmp_path / "ckpt" / "model.safetensors")
    del t["layers.1.attn.wkv.weight"]
    save_file(t, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(CheckpointError):
        compile_model(_spec(tmp_path, tmp_path / "ckpt"), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "model.yaml"]


def test_refuses_to_replace_a_directory_that_is_not_an_artifact(built, tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(main, ["compile", str(built / "model.yaml"), "-o", str(tmp_path / "precious")])
    assert result.exit_code == 2 and "is not a v4c artifact; refusing to replace it" in result.output
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


# --- verification ------------------------------------------------------------------------------------
def _shard(art):
    return next((art / "weights").iterdir())


def _flip(path, at=1000):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(art, edit):
    m = json.loads((art / "manifest.json").read_text())
    edit(m)
    (art / "manifest.json").write_text(json.dumps(m))


REFUSALS = {
    "flipped_byte": (lambda a: _flip(_shard(a)), r"weights/shard-00000-of-00001\.safetensors: sha256 does not match"),
    "truncated": (lambda a: _shard(a).write_bytes(_shard(a).read_bytes()[:-10]), r"shard-00000.*bytes, the manifest says"),
    "missing": (lambda a: (a / "program.json").unlink(), r"program\.json: listed in the manifest but missing"),
    "extra": (lambda a: (a / "weights" / "evil.safetensors").write_bytes(b"x"), r"weights/evil\.safetensors: present .* not listed"),
    "escaping_path": (lambda a: _edit_manifest(a, lambda m: m["files"].update({"../outside.txt": {"size": 1, "sha256": "0"}})),
                      r"'\.\./outside\.txt' points outside the artifact"),
    "unknown_major": (lambda a: _edit_manifest(a, lambda m: m.update(format_version="2.0")),
                      r"artifact format 2\.0 \(written by v4c 0\.1\.0\); this v4c reads format 1\.x"),
    "symlink": (lambda a: (a / "tokenizer").mkdir() or (a / "tokenizer" / "x").symlink_to("/etc/hostname"),
                r"tokenizer/x: present .* not listed"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_verify_refuses_and_names_the_file(case, art):
    damage, message = REFUSALS[case]
    assert _verify(art).exit_code == 0
    damage(art)
    result = _verify(art)
    assert result.exit_code == 1
    assert __import__("re").search(message, result.output), result.output
    # the runtime refuses to run it too, before using any weight
    run = CliRunner().invoke(main, ["generate", str(art), "--token-ids", "1", "--max-new-tokens", "1"])
    assert run.exit_code == 2 and "Traceback" not in run.output


# --- signatures --------------------------------------------------------------------------------------
def test_sign_and_verify_with_keys(art, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("release", "other"):
        assert CliRunner().invoke(main, ["keygen", str(keys / name)]).exit_code == 0
    assert oct((keys / "release").stat().st_mode & 0o777) == "0o600"
    unsigned = _verify(art, "--key", str(keys / "release.pub"))
    assert unsigned.exit_code == 1 and "the artifact is not signed" in unsigned.output
    assert CliRunner().invoke(main, ["sign", str(art), "--key", str(keys / "release")]).exit_code == 0
    good = _verify(art, "--key", str(keys / "release.pub"))
    assert good.exit_code == 0 and "is valid" in good.output
    wrong = _verify(art, "--key", str(keys / "other.pub"))
    assert wrong.exit_code == 1 and "manifest.sig: the signature does not verify" in wrong.output
    # re-hash a tampered file into the manifest: the files verify, the signature does not
    _flip(_shard(art))
    from v4c.runtime.artifact import sha256_file
    _edit_manifest(art, lambda m: m["files"][_shard(art).relative_to(art).as_posix()].update(sha256=sha256_file(_shard(art))))
    assert _verify(art).exit_code == 0
    tampered = _verify(art, "--key", str(keys / "release.pub"))
    assert tampered.exit_code == 1 and "signature does not verify" in tampered.output


# --- packing -------------------------------------------------------------------------------------------
def test_packed_file_is_deterministic_verifiable_and_runs(built, tmp_path):
    for name in ("a.v4c", "b.v4c"):
        assert CliRunner().invoke(main, ["pack", str(built / "art"), "-o", str(tmp_path / name)]).exit_code == 0
    assert (tmp_path / "a.v4c").read_bytes() == (tmp_path / "b.v4c").read_bytes()
    assert _verify(tmp_path / "a.v4c").exit_code == 0
    ids = tokens(1, 40, seed=5)[0].tolist()
    packed = score_tokens(open_artifact(tmp_path / "a.v4c").session(), ids)
    unpacked = score_tokens(open_artifact(built / "art").session(), ids)
    assert torch.equal(packed, unpacked)
    with tarfile.open(tmp_path / "a.v4c") as tar:
        names = tar.getnames()
        assert names[0] == "manifest.json" and all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())


def test_packed_file_with_a_flipped_byte_is_refused(built, tmp_path):
    CliRunner().invoke(main, ["pack", str(built / "art"), "-o", str(tmp_path / "a.v4c")])
    with tarfile.open(tmp_path / "a.v4c") as tar:
        shard = next(m for m in tar.getmembers() if m.name.startswith("weights/"))
    data = bytearray((tmp_path / "a.v4c").read_bytes())
    data[shard.offset_data + shard.size // 2] ^= 1  # inside the weights
    (tmp_path / "a.v4c").write_bytes(bytes(data))
    result = _verify(tmp_path / "a.v4c")
    assert result.exit_code == 1 and f"{shard.name}: sha256 does not match" in result.output


# --- inspect and the memory plan -----------------------------------------------------------------------
def test_inspect_reports_components_kv_families_and_plans(built):
    result = CliRunner().invoke(main, ["inspect", str(built / "art"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["model"]["attention"] == {"csa": 1, "hca": 1, "sliding": 1}
    assert {"embedding", "attention", "compressor", "indexer", "routed experts", "router", "mHC",
            "shared expert", "norms", "output head"} <= set(info["weights"]["by_component"])
    fams = info["kv"]["families"]
    assert set(fams) == {"sliding ring", "CSA entries", "CSA indexer keys", "HCA entries", "compressor buffers"}
    assert fams["CSA entries"]["bytes_per_token"] == 32 * 4 / 4  # head_dim 32, fp32, one entry per 4 tokens
    assert fams["HCA entries"]["bytes_per_token"] == 32 * 4 / 16
    assert fams["CSA indexer keys"]["bytes_per_token"] == 16 * 4 / 4
    assert fams["sliding ring"]["fixed_bytes"] == 3 * 7 * 32 * 4  # 3 layers x (window - 1) x head_dim x fp32
    assert info["plans"]["memory"]["arena_bytes_batch1"] > 0
    text = CliRunner().invoke(main, ["inspect", str(built / "art")])
    assert text.exit_code == 0 and "CSA indexer keys" in text.output and "memory plan" in text.output


def test_memory_plan_is_valid_and_matches_the_allocator(built):
    art = open_artifact(built / "art")
    plan = json.loads((built / "art" / "plans" / "memory.json").read_text())
    bufs = list(plan["buffers"].values())
    for i, a in enumerate(bufs):
        assert a["offset"] % plan["alignment"] == 0
        for b in bufs[i + 1:]:
            if a["first"] <= b["last"] and b["first"] <= a["last"]:  # alive together: must not overlap
                assert a["offset"] + a["bytes"] <= b["offset"] or b["offset"] + b["bytes"] <= a["offset"]
    assert max(b["offset"] + b["bytes"] for b in bufs) <= plan["bytes_per_token"]
    recorded = art.manifest["memory_plan"]
    assert recorded["bytes_per_token"] == plan["bytes_per_token"]
    assert recorded["bytes_per_token"] < recorded["bytes_per_token_without_reuse"] / 3  # reuse pays
    for batch in (1, 3):
        session = art.session(batch=batch)
        assert session.arena.numel() == recorded["arena_bytes_batch1"] * batch
    # prompts longer than the chunk are fed through the same arena, chunk by chunk
    ids = tokens(1, 50, seed=6)[0].tolist()
    chunked = score_tokens(art.session(), ids)  # prefill_chunk = 16
    stepwise = score_tokens(art.session(), ids, chunk=16)
    assert torch.equal(chunked, stepwise)


def test_weights_are_written_one_tensor_at_a_time(tmp_path):
    """Shards stream from the (lazy) sources: never more than one loaded weight alive, and every
    dtype v4c writes reads back exactly through safetensors."""
    import weakref

    from safetensors.torch import load_file

    from v4c.artifact_writer import _write_safetensors
    from v4c.ir import WeightSource
    alive, peak = [0], [0]

    def source(t):
        def load():
            out = t.clone()
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            weakref.finalize(out, lambda: alive.__setitem__(0, alive[0] - 1))
            return out
        return WeightSource(t.shape, t.dtype, load, "test")

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(7, 5, generator=g), "b": torch.randn(3, generator=g).to(torch.bfloat16),
               "c": torch.randint(-9, 9, (4, 2), generator=g, dtype=torch.int32),
               "d": torch.randn(6, 6, generator=g).to(torch.float8_e4m3fn),
               "e": torch.tensor([0.5, 4.0]).to(torch.float8_e8m0fnu), "f": torch.zeros(0, 3)}
    written = []
    _write_safetensors(tmp_path / "w.safetensors", list(tensors), {k: source(v) for k, v in tensors.items()},
                       written.append)
    assert peak[0] == 1 and sum(written) == sum(t.numel() * t.dtype.itemsize for t in tensors.values())
    back = load_file(tmp_path / "w.safetensors")
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k].view(torch.uint8), v.view(torch.uint8)), k

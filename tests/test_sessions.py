"""Sessions: save and resume bit for bit; every fault is reported, recomputed, and never a wrong token."""

import errno
import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from click.testing import CliRunner

from conftest import tokens
from v4c.cli import main
from v4c.compile import compile_model
from v4c.runtime.artifact import open_artifact
from v4c.runtime.sessions import Conversation, SessionMiss, SessionSaveError, artifact_key

NAME = "hc2_yarn"  # CSA (rate 4), HCA (rate 16), window 8


@pytest.fixture(scope="module")
def art(tmp_path_factory, hf_checkpoints):
    root = tmp_path_factory.mktemp("sessions")
    (root / "model.yaml").write_text(f"model:\n  checkpoint: {hf_checkpoints[NAME]}\nkv:\n  max_context: 512\n"
                                     "  prefill_chunk: 64\n  tiers: {disk: {path: ./kv, size: 1MiB}}\n")
    compile_model(root / "model.yaml", root / "art")
    return open_artifact(root / "art")


P1, P2 = tokens(1, 37, seed=1)[0].tolist(), tokens(1, 11, seed=2)[0].tolist()


def _continuous(art):
    conv = Conversation(art.session())
    first = list(conv.generate(P1, 9))
    return first, list(conv.generate(P2, 13)), conv


def _state_equal(a, b) -> bool:
    sa, sb = a.export_state(), b.export_state()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].view(torch.uint8), sb[k].view(torch.uint8)) for k in sa)


def test_resume_is_bit_identical_to_never_stopping(art, tmp_path):
    first, second, never_stopped = _continuous(art)
    conv = Conversation(art.session())
    assert list(conv.generate(P1, 9)) == first
    pos = conv.session.pos
    assert pos % 4 and pos % 16 and pos % 8  # mid-window: ring and both compressor buffers partly filled
    conv.save(tmp_path / "s.v4s", artifact_key(art.manifest))
    resumed = Conversation.load(tmp_path / "s.v4s", art.session(), artifact_key(art.manifest))
    assert resumed.session.pos == pos and resumed.history == conv.history and resumed.pending == conv.pending
    assert list(resumed.generate(P2, 13)) == second
    assert _state_equal(resumed.session, never_stopped.session)


def test_cli_session_round_trip(art, tmp_path):
    first, second, _ = _continuous(art)
    path = tmp_path / "chat.v4s"
    run = lambda ids, n: json.loads(CliRunner().invoke(main, [  # noqa: E731
        "generate", str(art.store.root), "--token-ids", ",".join(map(str, ids)), "--max-new-tokens", str(n),
        "--session", str(path), "--ignore-eos", "--json"]).output)
    a = run(P1, 9)
    assert a["token_ids"] == first and a["session"]["saved"] and not a["session"]["resumed"]
    b = run(P2, 13)
    assert b["token_ids"] == second and b["session"]["resumed"] and b["session"]["miss"] is None


def _saved(art, path):
    conv = Conversation(art.session())
    list(conv.generate(P1, 9))
    conv.save(path, artifact_key(art.manifest))
    return conv


def _resume_or_recompute(art, path):
    """What `generate --session` does: resume, or recompute from the file's history on a miss."""
    session = art.session()
    try:
        conv, miss = Conversation.load(path, session, artifact_key(art.manifest)), None
    except SessionMiss as e:
        session.reset()
        conv, miss = Conversation(session, [], (e.history + e.pending) if e.history is not None else []), e
    return list(conv.generate(P2, 13)), miss


def _flip(path, offset_from_end):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda p: _flip(p, 100), "fails its checksum"),  # a bit flipped in a saved page
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) - 500]), "truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[:40]), "header is damaged"),
    (lambda p: p.write_bytes(b"hello"), "not a v4c session file"),
])
def test_a_damaged_session_is_a_reported_miss_and_no_wrong_token(damage, message, art, tmp_path):
    _, second, _ = _continuous(art)
    path = tmp_path / "s.v4s"
    _saved(art, path)
    damage(path)
    new_tokens, miss = _resume_or_recompute(art, path)
    assert miss is not None and message in miss.reason
    if miss.history is not None:  # header intact: the conversation is recomputed, the same tokens follow
        assert new_tokens == second
    else:  # nothing recoverable: a fresh conversation, still correct for what it knows
        fresh = Conversation(art.session())
        assert new_tokens == list(fresh.generate(P2, 13))


def test_a_session_of_another_artifact_is_a_miss(art, tmp_path):
    path = tmp_path / "s.v4s"
    conv = _saved(art, path)
    key = dict(artifact_key(art.manifest), weights_sha256="0" * 64)
    with pytest.raises(SessionMiss, match="saved with another artifact") as e:
        Conversation.load(path, art.session(), key)
    assert e.value.history == conv.history


def test_io_error_on_read_is_a_miss(art, tmp_path, monkeypatch):
    path = tmp_path / "s.v4s"
    _saved(art, path)
    real = type(path).read_bytes

    def failing(self):
        if self == path:
            raise OSError(errno.EIO, "Input/output error")
        return real(self)
    monkeypatch.setattr(type(path), "read_bytes", failing)
    new_tokens, miss = _resume_or_recompute(art, path)
    assert "Input/output error" in miss.reason
    assert new_tokens == list(Conversation(art.session()).generate(P2, 13))


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failed_save_is_reported_and_keeps_the_old_file(err, art, tmp_path, monkeypatch):
    path = tmp_path / "s.v4s"
    old = _saved(art, path)
    before = path.read_bytes()
    conv = Conversation(art.session())
    list(conv.generate(P1 + P2, 5))
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(err, os.strerror(err))))
    with pytest.raises(SessionSaveError, match="session not saved"):
        conv.save(path, artifact_key(art.manifest))
    monkeypatch.setattr(os, "write", real_write)
    assert path.read_bytes() == before  # the previous session is intact
    assert not list(tmp_path.glob(".s.v4s.tmp-*"))  # and no temporary is left behind
    assert Conversation.load(path, art.session(), artifact_key(art.manifest)).history == old.history


def test_generate_reports_a_failed_save_without_crashing(art, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "open", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
    out = CliRunner().invoke(main, ["generate", str(art.store.root), "--token-ids", "1,2,3", "--max-new-tokens", "4",
                                    "--session", str(tmp_path / "s.v4s"), "--json"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output.splitlines()[-1])
    assert len(payload["token_ids"]) == 4 and payload["session"]["saved"] is False
    assert "Read-only file system" in payload["session"]["error"]


def test_the_disk_tier_budget_limits_saved_sessions(art, tmp_path):
    conv = Conversation(art.session())
    list(conv.generate(P1, 3))
    with pytest.raises(SessionSaveError, match="exceed the disk tier"):
        conv.save(tmp_path / "s.v4s", artifact_key(art.manifest), disk_budget=1000)


KILLER = """
import os, signal, sys
from v4c.runtime.artifact import open_artifact
from v4c.runtime.sessions import Conversation, artifact_key
art = open_artifact(sys.argv[1])
conv = Conversation(art.session())
list(conv.generate(list(range(1, 60)), 3))
real, calls = os.write, [0]
def write(fd, data):
    calls[0] += 1
    if calls[0] == 2:  # after the header, in the middle of the pages
        os.kill(os.getpid(), signal.SIGKILL)
    return real(fd, data)
os.write = write
conv.save(sys.argv[2], artifact_key(art.manifest))
"""


def test_kill_during_save_leaves_the_old_session(art, tmp_path):
    path = tmp_path / "s.v4s"
    old = _saved(art, path)
    before = path.read_bytes()
    result = subprocess.run([sys.executable, "-c", KILLER, str(art.store.root), str(path)], timeout=300)
    assert result.returncode == -9
    assert path.read_bytes() == before
    assert list(tmp_path.glob(".s.v4s.tmp-*"))  # the dead writer's temporary...
    _saved(art, path)  # ...is cleaned up by the next save
    assert not list(tmp_path.glob(".s.v4s.tmp-*"))
    assert Conversation.load(path, art.session(), artifact_key(art.manifest)).history == old.history


def test_concurrent_saves_to_one_directory(art, tmp_path):
    convs = []
    for prompt in (P1, P2, P1 + P2):
        c = Conversation(art.session())
        list(c.generate(prompt, 4))
        convs.append(c)
    key = artifact_key(art.manifest)
    targets = [tmp_path / "a.v4s", tmp_path / "b.v4s", tmp_path / "a.v4s"]  # two writers race for a.v4s
    threads = [threading.Thread(target=c.save, args=(t, key)) for c, t in zip(convs, targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b = Conversation.load(tmp_path / "b.v4s", art.session(), key)
    assert b.history == convs[1].history
    a = Conversation.load(tmp_path / "a.v4s", art.session(), key)  # one of the two, intact
    assert a.history in (convs[0].history, convs[2].history)
    assert not list(tmp_path.glob(".*.tmp-*"))

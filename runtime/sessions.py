"""Conversations that save to disk and resume bit for bit.

A `Conversation` is a session plus its token history (every token fed so far) and the tokens
generated but not yet fed (`pending`: the last one). Continuing feeds pending + the new prompt as
one prefill, whether the conversation stayed in memory or was saved and loaded, so a resume is
bit-identical to never having stopped.

Session file (written to a temporary name and renamed, so a crash never leaves a half file):

    b"V4CSESS1" | header length (8 bytes, LE) | header JSON | sha256(header)
    | page 0 | sha256(page 0) | page 1 | sha256(page 1) | ...

The header names the artifact (sha256 of its weight files' hashes, and of its KV layout), the
position, the history, the pending tokens and every state slot (dtype, shape); the pages hold the
slots' bytes in that order. Any damage is a `SessionMiss` that says what is wrong (and carries the
history when the header survived, so the caller can recompute instead of trusting bad state).
"""

import hashlib
import json
import os
from pathlib import Path

import torch

from .dtypes import dtype_name, torch_dtype
from .errors import V4CError
from .executor import Session
from .generate import Sampling, generate

MAGIC = b"V4CSESS1"
VERSION = 1
PAGE_BYTES = 1 << 20
DIGEST = 32


class SessionMiss(Exception):
    """A session file that cannot be used. `history` / `pending`: recoverable tokens, or None."""

    def __init__(self, reason: str, history: list[int] | None = None, pending: list[int] | None = None):
        super().__init__(reason)
        self.reason, self.history, self.pending = reason, history, pending


class SessionSaveError(V4CError):
    pass


def artifact_key(manifest: dict) -> dict:
    weights = sorted((rel, manifest["files"][rel]["sha256"]) for rel in manifest["weights"])
    layout = json.dumps(manifest["kv"]["state"], sort_keys=True)
    return {"weights_sha256": hashlib.sha256(json.dumps(weights).encode()).hexdigest(),
            "kv_layout_sha256": hashlib.sha256(layout.encode()).hexdigest()}


class Conversation:
    def __init__(self, session: Session, history=(), pending=()):
        self.session, self.history, self.pending = session, list(history), list(pending)

    def generate(self, prompt: list[int], max_new_tokens: int, sampling: Sampling | None = None, stop_ids=()):
        """Feed pending + prompt, then yield up to `max_new_tokens` new ids as they come."""
        feed = self.pending + list(prompt)
        produced = []
        for token in generate(self.session, feed, max_new_tokens, sampling or Sampling(), stop_ids):
            produced.append(token)
            yield token
        self.history += feed + produced[:-1]  # the last new token is not fed yet
        self.pending = produced[-1:]

    # persistence -------------------------------------------------------------------------------
    def save(self, path, key: dict, disk_budget: int | None = None) -> int:
        """Write the complete incremental state; -> bytes written. Raises SessionSaveError."""
        state = self.session.export_state()
        slots = [{"name": n, "dtype": dtype_name(t.dtype), "shape": list(t.shape)} for n, t in state.items()]
        header = json.dumps({"version": VERSION, "key": key, "pos": self.session.pos, "batch": self.session.batch,
                             "history": self.history, "pending": self.pending, "slots": slots,
                             "page_bytes": PAGE_BYTES}, sort_keys=True).encode()
        payload = b"".join(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in state.values())
        pages = [payload[i:i + PAGE_BYTES] for i in range(0, len(payload), PAGE_BYTES)]
        size = len(MAGIC) + 8 + len(header) + DIGEST + sum(len(p) + DIGEST for p in pages)
        if disk_budget is not None and size > disk_budget:
            raise SessionSaveError(f"session not saved: {size:,} bytes exceed the disk tier's {disk_budget:,}")
        path = Path(path)
        _remove_stale_temporaries(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{id(self)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, MAGIC + len(header).to_bytes(8, "little") + header + hashlib.sha256(header).digest())
                for page in pages:
                    _write_all(fd, page + hashlib.sha256(page).digest())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise SessionSaveError(f"session not saved to {path}: {e.strerror or e}") from None
        return size

    @classmethod
    def load(cls, path, session: Session, key: dict) -> "Conversation":
        """Restore a saved conversation into the fresh `session`. Raises SessionMiss."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise SessionMiss(f"cannot read {path}: {e.strerror or e}") from None
        if data[:len(MAGIC)] != MAGIC:
            raise SessionMiss(f"{path} is not a v4c session file")
        n = int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "little")
        start = len(MAGIC) + 8
        header_bytes, digest = data[start:start + n], data[start + n:start + n + DIGEST]
        if len(header_bytes) != n or hashlib.sha256(header_bytes).digest() != digest:
            raise SessionMiss(f"{path}: the header is damaged (truncated or altered)")
        header = json.loads(header_bytes)
        history, pending = header["history"], header["pending"]
        if header.get("version") != VERSION:
            raise SessionMiss(f"{path}: session format {header.get('version')}; this runtime reads {VERSION}",
                              history, pending)
        if header["key"] != key:
            raise SessionMiss(f"{path} was saved with another artifact (weights or KV layout differ)", history, pending)
        if header["batch"] != session.batch or header["pos"] > session.program.max_context:
            raise SessionMiss(f"{path} does not fit this session (batch {header['batch']}, {header['pos']} tokens)",
                              history, pending)
        payload, offset, page_bytes = bytearray(), start + n + DIGEST, header["page_bytes"]
        total = sum(torch_dtype(s["dtype"]).itemsize * _numel(s["shape"]) for s in header["slots"])
        for index in range(-(-total // page_bytes)):
            size = min(page_bytes, total - index * page_bytes)
            page, check = data[offset:offset + size], data[offset + size:offset + size + DIGEST]
            if len(page) != size or len(check) != DIGEST:
                raise SessionMiss(f"{path} is truncated (page {index} of {-(-total // page_bytes)})", history, pending)
            if hashlib.sha256(page).digest() != check:
                raise SessionMiss(f"{path}: page {index} fails its checksum", history, pending)
            payload += page
            offset += size + DIGEST
        state, at = {}, 0
        for s in header["slots"]:
            nbytes = torch_dtype(s["dtype"]).itemsize * _numel(s["shape"])
            raw = torch.frombuffer(payload, dtype=torch.uint8, count=nbytes, offset=at) if nbytes else torch.empty(0, dtype=torch.uint8)
            state[s["name"]] = raw.clone().view(torch_dtype(s["dtype"])).view(s["shape"])
            at += nbytes
        if set(state) != set(session.state):
            raise SessionMiss(f"{path} holds other state slots than this artifact", history, pending)
        session.import_state(state, header["pos"])
        return cls(session, history, pending)


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of saves whose process died (e.g. killed mid-write)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            tmp.unlink(missing_ok=True)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]

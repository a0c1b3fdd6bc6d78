"""Calibration and held-out data: token windows sampled deterministically from a text or JSONL file.

    .jsonl   one JSON object per line, with "text" (tokenized with the checkpoint's tokenizer) or
             "token_ids" (used as given); each line is a document
    other    plain text, one document

Documents are concatenated into one token stream. Windows of `seq_len` tokens start at positions
drawn with a seeded generator. When no separate held-out file is given, the first 90% of the
stream serves calibration and the last 10% the held-out report, so the two never overlap.
"""

import hashlib
import json
from pathlib import Path

import torch

from v4c.runtime.errors import V4CError

HELDOUT_SHARE = 0.1


class CalibrationError(V4CError):
    pass


def token_stream(path: Path, tokenizer_path: Path | None, vocab_size: int) -> torch.Tensor:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{path}: cannot read calibration data ({e})") from None
    tok = None

    def encode(s: str) -> list[int]:
        nonlocal tok
        if tokenizer_path is None:
            raise CalibrationError(f"{path} holds text but the checkpoint has no tokenizer.json; give token_ids "
                                   "in a JSONL file instead")
        if tok is None:
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(str(tokenizer_path))
        return tok.encode(s).ids

    ids: list[int] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(doc, dict) and isinstance(doc.get("token_ids"), list):
                ids += doc["token_ids"]
            elif isinstance(doc, dict) and isinstance(doc.get("text"), str):
                ids += encode(doc["text"])
            else:
                raise CalibrationError(f"{path}:{n}: each line needs \"text\" (a string) or \"token_ids\" (a list)")
    else:
        ids = encode(text)
    stream = torch.tensor(ids, dtype=torch.long)
    if stream.numel() and (int(stream.min()) < 0 or int(stream.max()) >= vocab_size):
        raise CalibrationError(f"{path}: token ids must lie in [0, {vocab_size})")
    return stream


def windows(stream: torch.Tensor, count: int, seq_len: int, seed: int, what: str, path: Path) -> torch.Tensor:
    """`count` windows of `seq_len` tokens at seeded random starts -> [count, seq_len]."""
    if stream.numel() < seq_len:
        raise CalibrationError(f"{path}: {what} needs windows of {seq_len} tokens but has only {stream.numel()} tokens")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (count,), generator=g)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def split(stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cut = int(stream.numel() * (1 - HELDOUT_SHARE))
    return stream[:cut], stream[cut:]


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

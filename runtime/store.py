"""Where an artifact's files live: a directory, or one packed `.v4c` file.

A packed artifact is an uncompressed POSIX tar with `manifest.json` first and every other file
sorted by path, all with mtime 0, owner 0 and mode 0644, so packing is deterministic. Only
regular files are allowed; a member that is a link or escapes the root is refused.
"""

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from .errors import ArtifactError

CHUNK = 1 << 22


def check_member(rel: str) -> None:
    p = PurePosixPath(rel)
    if not rel or rel in (".",) or p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise ArtifactError(f"{rel!r} points outside the artifact")


class DirStore:
    def __init__(self, root: Path):
        self.root = root
        self.label = str(root)

    def files(self) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file() or p.is_symlink())

    def exists(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def is_regular(self, rel: str) -> bool:
        p = self.root / rel
        return p.is_file() and not p.is_symlink() and p.resolve().is_relative_to(self.root.resolve())

    def size(self, rel: str) -> int:
        return (self.root / rel).stat().st_size

    def read(self, rel: str, start: int = 0, length: int | None = None) -> bytes:
        with open(self.root / rel, "rb") as f:
            f.seek(start)
            return f.read() if length is None else f.read(length)

    def chunks(self, rel: str) -> Iterator[bytes]:
        with open(self.root / rel, "rb") as f:
            yield from iter(lambda: f.read(CHUNK), b"")

    def local_path(self, rel: str) -> Path | None:
        return self.root / rel


class TarStore:
    def __init__(self, path: Path):
        self.path, self.label = path, str(path)
        try:
            self._tar = tarfile.open(path, "r:")
        except (tarfile.TarError, OSError) as e:
            raise ArtifactError(f"{path}: not a packed v4c artifact ({e})") from None
        self._members = {}
        for m in self._tar.getmembers():
            check_member(m.name)
            self._members[m.name] = m

    def files(self) -> list[str]:
        return sorted(self._members)

    def exists(self, rel: str) -> bool:
        return rel in self._members

    def is_regular(self, rel: str) -> bool:
        return self._members[rel].isreg()

    def size(self, rel: str) -> int:
        return self._members[rel].size

    def read(self, rel: str, start: int = 0, length: int | None = None) -> bytes:
        f = self._tar.extractfile(self._members[rel])
        f.seek(start)
        return f.read() if length is None else f.read(length)

    def chunks(self, rel: str) -> Iterator[bytes]:
        f = self._tar.extractfile(self._members[rel])
        yield from iter(lambda: f.read(CHUNK), b"")

    def local_path(self, rel: str) -> Path | None:
        return None


def open_store(path) -> DirStore | TarStore:
    path = Path(path)
    if path.is_dir():
        return DirStore(path)
    if path.is_file():
        return TarStore(path)
    raise ArtifactError(f"{path} is not an artifact directory or a packed .v4c file")


def pack(store: DirStore, files: list[str], out: Path) -> None:
    """Write `files` of an artifact directory into one deterministic tar at `out` (atomically)."""
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        with tarfile.open(tmp, "w:", format=tarfile.PAX_FORMAT) as tar:
            for rel in files:
                info = tarfile.TarInfo(rel)
                info.size, info.mtime, info.mode, info.uid, info.gid = store.size(rel), 0, 0o644, 0, 0
                with open(store.root / rel, "rb") as f:
                    tar.addfile(info, f)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

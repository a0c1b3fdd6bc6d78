"""Open and verify an artifact directory.

    manifest.json      format + version, producer, model config, pipeline, target, KV layout,
                       and every other file with its size and sha256
    module.v4ir        the compiled IR as text (for people and tools; the runtime does not parse it)
    program.json       the lowered kernel list the executor runs
    weights/*.safetensors
    tokenizer/         tokenizer.json and friends, when the checkpoint had them

Every file is checked against the manifest before any weight is used.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
from safetensors import safe_open

from .config import ModelConfig
from .errors import ArtifactError
from .executor import Session
from .program import Program

FORMAT = "v4c-artifact"
FORMAT_VERSION = "1.0"
MANIFEST = "manifest.json"
UNHASHED = (MANIFEST, "manifest.sig")  # the manifest and its signature sit outside `files`


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an artifact directory")
    if not path.is_file():
        raise ArtifactError(f"{root} has no {MANIFEST}; is it a v4c artifact?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a {FORMAT} manifest")
    version = str(manifest.get("format_version", ""))
    major = version.split(".")[0]
    if major != FORMAT_VERSION.split(".")[0]:
        producer = manifest.get("producer", {}).get("version", "an unknown version")
        raise ArtifactError(f"{path}: artifact format {version or '(none)'} (written by v4c {producer}); this v4c "
                            f"reads format {FORMAT_VERSION.split('.')[0]}.x. Use v4c {producer} or later to run it, "
                            "or recompile the model with this v4c")
    if not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path}: the manifest lists no files")
    return manifest


def _safe_member(root: Path, rel: str) -> Path:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel in ("", ".") or "\\" in rel:
        raise ArtifactError(f"manifest entry {rel!r} points outside the artifact")
    return root / p


def verify_files(root: Path, manifest: dict) -> None:
    """Raise ArtifactError naming the first file that is missing, truncated, altered or unlisted."""
    listed = {}
    for rel, meta in sorted(manifest["files"].items()):
        path = _safe_member(root, rel)
        listed[path.resolve()] = rel
        if not path.is_file():
            raise ArtifactError(f"{rel}: listed in the manifest but missing from {root}")
        size = path.stat().st_size
        if size != meta.get("size"):
            raise ArtifactError(f"{rel}: {size} bytes, the manifest says {meta.get('size')} (truncated or replaced)")
        if sha256_file(path) != meta.get("sha256"):
            raise ArtifactError(f"{rel}: sha256 does not match the manifest (the file was altered)")
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in UNHASHED and path.resolve() not in listed:
            raise ArtifactError(f"{rel}: present in {root} but not listed in the manifest")


@dataclass
class Artifact:
    root: Path
    manifest: dict
    program: Program
    config: ModelConfig
    _weights: dict = field(default=None, repr=False)

    def weights(self) -> dict[str, torch.Tensor]:
        if self._weights is None:
            out = {}
            for rel in self.manifest["weights"]:
                with safe_open(self.root / rel, "pt") as f:
                    out.update({k: f.get_tensor(k) for k in f.keys()})
            self._weights = out
        return self._weights

    def session(self, batch: int = 1) -> Session:
        return Session(self.program, self.weights(), batch=batch)

    def tokenizer(self):
        rel = self.manifest.get("tokenizer")
        if not rel:
            return None
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(self.root / rel))


def open_artifact(path, verify: bool = True) -> Artifact:
    root = Path(path)
    manifest = read_manifest(root)
    if verify:
        verify_files(root, manifest)
    try:
        program = Program.from_json((root / manifest["program"]).read_text())
        config = ModelConfig.from_dict(manifest["model"])
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactError(f"{root}: manifest or program is malformed ({e})") from None
    return Artifact(root, manifest, program, config)

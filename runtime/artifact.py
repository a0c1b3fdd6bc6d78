"""Open and verify an artifact (a directory, or the same files packed into one `.v4c` file).

    manifest.json      format + version, producer, model config, pipeline, target and toolchain,
                       KV layout, memory plan, and every other file with its size and sha256
    manifest.sig       optional Ed25519 signature over manifest.json (`v4c sign`)
    module.v4ir        the compiled IR as text (for people and tools; the runtime does not parse it)
    program.json       the lowered kernel list the executor runs
    kernels/triton/    triton artifacts: the kernel package (source) and launch.json (launch configs)
    plans/memory.json  the activation buffer plan
    weights/*.safetensors
    tokenizer/         tokenizer.json and friends, when the checkpoint had them

Every file is checked against the manifest before any weight is used.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors

from .config import ModelConfig
from .errors import ArtifactError
from .executor import Session
from .kernelset import TorchKernels, triton_kernels
from .program import Program
from .tvm_kernels import tvm_kernels
from .store import DirStore, TarStore, check_member, open_store, pack

FORMAT = "v4c-artifact"
FORMAT_VERSION = "1.0"
MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
UNHASHED = (MANIFEST, SIGNATURE)  # the manifest and its signature sit outside `files`


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_chunks(iter(lambda: f.read(1 << 22), b""))


def sha256_chunks(chunks) -> str:
    h = hashlib.sha256()
    for block in chunks:
        h.update(block)
    return h.hexdigest()


def read_manifest(store) -> dict:
    if not store.exists(MANIFEST):
        raise ArtifactError(f"{store.label} has no {MANIFEST}; is it a v4c artifact?")
    try:
        manifest = json.loads(store.read(MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{store.label}/{MANIFEST}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{store.label}/{MANIFEST}: not a {FORMAT} manifest")
    version = str(manifest.get("format_version", ""))
    if version.split(".")[0] != FORMAT_VERSION.split(".")[0]:
        producer = manifest.get("producer", {}).get("version", "an unknown version")
        raise ArtifactError(
            f"{store.label}/{MANIFEST}: artifact format {version or '(none)'} (written by v4c {producer}); this v4c reads "
            f"format {FORMAT_VERSION.split('.')[0]}.x. Run it with v4c {producer} or later, or recompile the model "
            "with this v4c")
    if not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{store.label}/{MANIFEST}: the manifest lists no files")
    return manifest


def verify_files(store, manifest: dict) -> int:
    """Raise ArtifactError naming the first file that is missing, truncated, altered, unlisted or
    outside the artifact; return the number of files checked."""
    listed = manifest["files"]
    for rel in sorted(listed):
        try:
            check_member(rel)
        except ArtifactError as e:
            raise ArtifactError(f"manifest entry {e}") from None
    for rel in store.files():
        if rel not in listed and rel not in UNHASHED:
            raise ArtifactError(f"{rel}: present in {store.label} but not listed in the manifest")
    for rel, meta in sorted(listed.items()):
        if not store.exists(rel):
            raise ArtifactError(f"{rel}: listed in the manifest but missing from {store.label}")
        if not store.is_regular(rel):
            raise ArtifactError(f"{rel}: not a regular file inside the artifact (a link?)")
        size = store.size(rel)
        if size != meta.get("size"):
            raise ArtifactError(f"{rel}: {size} bytes, the manifest says {meta.get('size')} (truncated or replaced)")
        if sha256_chunks(store.chunks(rel)) != meta.get("sha256"):
            raise ArtifactError(f"{rel}: sha256 does not match the manifest (the file was altered)")
    return len(listed)


def safetensors_header(store, rel: str) -> dict:
    """The tensor table of a safetensors file (name -> dtype, shape, offsets), without its data."""
    n = int.from_bytes(store.read(rel, 0, 8), "little")
    header = json.loads(store.read(rel, 8, n))
    header.pop("__metadata__", None)
    return header


ALIGN = 64  # bytes; BLAS takes different (equally valid) summation paths for differently aligned data


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` at a 64-byte aligned address, so results do not depend on where the loader put it
    (memory-mapped tensors sit at their file offsets)."""
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


@dataclass
class Artifact:
    store: DirStore | TarStore
    manifest: dict
    program: Program
    config: ModelConfig
    _weights: dict = field(default=None, repr=False)
    _moved: dict = field(default_factory=dict, repr=False)  # device -> weights copied there

    @property
    def label(self) -> str:
        return self.store.label

    def weights(self) -> dict[str, torch.Tensor]:
        """All weights, 64-byte aligned (memory-mapped from a directory where already aligned;
        read through memory from a packed file)."""
        if self._weights is None:
            out = {}
            for rel in self.manifest["weights"]:
                path = self.store.local_path(rel)
                if path is not None:
                    with safe_open(path, "pt") as f:
                        out.update({k: _aligned(f.get_tensor(k)) for k in f.keys()})
                else:
                    out.update({k: _aligned(t) for k, t in load_safetensors(self.store.read(rel)).items()})
            self._weights = out
        return self._weights

    @property
    def target(self) -> str:
        return self.manifest.get("target", {}).get("name", "torch")

    def weights_on(self, device: str) -> dict[str, torch.Tensor]:
        if device == "cpu":
            return self.weights()
        if device not in self._moved:
            self._moved[device] = {k: t.to(device) for k, t in self.weights().items()}
        return self._moved[device]

    def session(self, batch: int = 1, *, kernels: str = "auto", device: str | None = None,
                strict: bool = False, graphs: bool = False) -> Session:
        """A fresh session. `kernels`: "auto" runs the artifact's own target's kernels, "torch" the
        runtime's reference kernels (any artifact). `device`: default cuda for a triton artifact (tvm: cpu)
        on a GPU machine (not under TRITON_INTERPRET), else cpu. `strict`: a Triton launcher that
        refuses its inputs is an error instead of a reported fallback. `graphs`: replay the position-independent
        runs of a triton artifact's steps as CUDA graphs (executor.Session; needs a CUDA device)."""
        if kernels not in ("auto", "torch", self.target):
            raise ArtifactError(f"kernels {kernels!r}: this {self.target} artifact runs 'auto' ({self.target}) "
                                "or 'torch' kernels")
        own = kernels != "torch"
        use_triton = self.target == "triton" and own
        device = device or default_device(use_triton)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ArtifactError(f"device {device}: no CUDA GPU is available to this process")
        if use_triton:
            table = triton_kernels(self.store, self.manifest, device=device, strict=strict)
        elif self.target == "tvm" and own:
            table = tvm_kernels(self.store, self.manifest, device=device, strict=strict)
        else:
            table = TorchKernels()
        return Session(self.program, self.weights_on(device), batch=batch, kernels=table, device=device,
                       graphs=graphs)

    def tokenizer(self):
        rel = self.manifest.get("tokenizer")
        if not rel:
            return None
        from tokenizers import Tokenizer
        return Tokenizer.from_str(self.store.read(rel).decode())


def default_device(triton: bool) -> str:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return "cuda" if triton and not interpret and torch.cuda.is_available() else "cpu"


def open_artifact(path, verify: bool = True) -> Artifact:
    """Open a directory or packed `.v4c` artifact; with `verify`, check every file first."""
    store = open_store(path)
    manifest = read_manifest(store)
    if verify:
        verify_files(store, manifest)
    try:
        program = Program.from_json(store.read(manifest["program"]).decode())
        config = ModelConfig.from_dict(manifest["model"])
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactError(f"{store.label}: manifest or program is malformed ({e})") from None
    return Artifact(store, manifest, program, config)


def pack_artifact(src, out) -> int:
    """Verify the artifact directory `src` and pack it into one `.v4c` file; -> bytes written."""
    store = open_store(src)
    if not isinstance(store, DirStore):
        raise ArtifactError(f"{src} is already a packed file")
    manifest = read_manifest(store)
    verify_files(store, manifest)
    extra = [f for f in UNHASHED[1:] if store.exists(f)]
    out = Path(out)
    pack(store, [MANIFEST] + extra + sorted(manifest["files"]), out)
    return out.stat().st_size

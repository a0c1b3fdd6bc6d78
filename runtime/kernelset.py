"""Kernel sets: which function runs each step of a program.

A `torch` artifact runs every step as the runtime's plain-PyTorch kernel (`KERNELS`).

A `triton` artifact ships its kernels as source: a Python package in `kernels/triton/` whose
`LAUNCHERS` have the torch kernels' signatures plus a `config` of launch parameters, and
`kernels/triton/launch.json`, written at compile time: the launch configurations of every step by
tokens per call (tuned on the compiling GPU, or the kernels' defaults, as it records), and the
ops that have no Triton kernel. `TritonKernels` imports that package from a cache directory
keyed by its hashes (Triton then compiles each kernel on first use and keeps the binary in its
own cache, so a restart does not recompile) and runs every step through it.

Every step of a triton artifact that runs as a torch kernel is a fallback, and is reported
(`report()`, `v4c generate --json`, a warning): an op without a Triton kernel, or a launcher that
refused its inputs at run time. With `strict`, a refusal is an error instead.
"""

import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from .errors import ArtifactError, V4CError
from .kernels import KERNELS
from .program import Step

PACKAGE = "kernels/triton"
LAUNCH = f"{PACKAGE}/launch.json"
LAUNCH_FORMAT = 1
VIEWS = frozenset({"reshape"})  # ops that only re-view their operand: no kernel runs in any target


class KernelError(V4CError):
    """A kernel refused its inputs where the user asked for no fallback."""


class TorchKernels:
    """Every step as the runtime's torch kernel."""

    name = "torch"

    def __init__(self):
        self.steps: dict[str, int] = {}

    def resolve(self, index: int, step: Step) -> Callable:
        if step.kernel not in KERNELS:
            raise ArtifactError(f"program uses kernel {step.kernel!r}, which this runtime does not have")
        self.steps[step.kernel] = self.steps.get(step.kernel, 0) + 1
        return KERNELS[step.kernel]

    def report(self) -> dict:
        return {"kernels": self.name, "steps": {"torch": sum(self.steps.values())}, "fallbacks": []}


def _pick(configs: list[dict], tokens: int) -> dict:
    """The launch config for a call with `tokens` tokens: the first bucket whose `max_tokens`
    covers it (buckets are in increasing order; the last has max_tokens None)."""
    for bucket in configs:
        if bucket["max_tokens"] is None or tokens <= bucket["max_tokens"]:
            return bucket["config"]
    return {}


def _tokens(x) -> int:
    """Tokens in a call: every kernel's first operand is an activation shaped [B, S, ...]."""
    shape = getattr(x, "shape", ())
    return int(shape[0] * shape[1]) if len(shape) >= 2 else int(shape[0]) if shape else 1


class _Launch:
    """One step's Triton launcher with its configs; falls back (reported) if the launcher refuses."""

    def __init__(self, owner: "TritonKernels", index: int, step: Step, launcher: Callable, configs: list[dict]):
        self.owner, self.index, self.kernel = owner, index, step.kernel
        self.launcher, self.configs, self.fallen = launcher, configs, False

    @property
    def graph_safe(self) -> bool:
        """Replayable as captured (executor.graph_safe): the launchers make no per-call host decision
        from tensor values (they read none on a GPU, common.host_values), and the configs are fixed per
        call shape; a step that fell back runs a torch kernel, which may read values."""
        return not self.fallen

    @property
    def device_position(self) -> bool:
        """A stateful launcher that takes `pos0` as a device tensor (executor._device_position)."""
        return bool(getattr(self.launcher, "device_position", False))

    def _run(self, args, kwargs, config: dict, **into):
        if not self.fallen:
            try:
                return self.launcher(*args, config=config, **into, **kwargs)
            except ValueError as e:
                self.owner.fall_back(self.index, self.kernel, f"the triton launcher refused its inputs: {e}")
                self.fallen = True
        pos0 = kwargs.get("pos0")
        if pos0 is not None and not isinstance(pos0, int):  # a device position: the torch kernels take an int
            kwargs = dict(kwargs, pos0=int(pos0.reshape(-1)[0]))
        return KERNELS[self.kernel](*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._run(args, kwargs, _pick(self.configs, _tokens(args[0]) if args else 1))

    def bind(self, inputs: list, outs: list, attrs: dict) -> list[tuple] | None:
        """This step's plan entry (executor): the launcher writes its results straight into the planned
        buffers `outs` (its `into`: no copy after it, on a GPU one kernel fewer a step), with the config of
        the plan's call shape picked once. A result elsewhere (a torch fallback, or a buffer the launcher
        could not write) is copied in. None, so the executor runs and copies as for any kernel, for a step
        without results or a launcher without `into` (an artifact packaged before it)."""
        if not outs or "into" not in _parameters(self.launcher):
            return None
        single = len(outs) == 1
        into = outs[0] if single else tuple(outs)
        config = _pick(self.configs, _tokens(inputs[0]) if inputs else 1)

        def run(*args, **kwargs):
            got = self._run(args, kwargs, config, into=into)
            for buffer, value in zip(outs, (got,) if single else got):
                if value.data_ptr() != buffer.data_ptr():
                    buffer.copy_(value)
        return [(run, inputs, attrs)]


def _parameters(fn: Callable) -> frozenset:
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # no signature to read
        return frozenset()


class ArtifactKernels:
    """Base of the kernel sets that run an artifact's own kernels (triton, tvm). `own(index, step)`
    gives the step's kernel, or None: the step then runs as the torch kernel, a fallback that is
    reported with its reason (`torch_ops` of the artifact, else a generic one), or with `strict`
    a KernelError. Views run as they are, in every target."""

    name = "artifact"

    def __init__(self, torch_ops: dict, *, strict: bool = False):
        self.torch_ops, self.strict = torch_ops, strict
        self.fallbacks: list[dict] = []
        self.own_steps = self.view_steps = self.refused = 0

    def fall_back(self, index: int, kernel: str, reason: str) -> None:
        """An own kernel refused its inputs at run time: the step runs as the torch kernel (reported),
        or with `strict` that is an error."""
        if self.strict:
            raise KernelError(f"step {index} ({kernel}): {reason} (strict: no fallback)")
        self.refused += 1
        self.fallbacks.append({"step": index, "kernel": kernel, "reason": reason})
        warnings.warn(f"v4c: step {index} ({kernel}) runs as the torch kernel: {reason}", RuntimeWarning, stacklevel=3)

    def own(self, index: int, step: Step) -> Callable | None:
        raise NotImplementedError

    def resolve(self, index: int, step: Step) -> Callable:
        if step.kernel not in KERNELS:
            raise ArtifactError(f"program uses kernel {step.kernel!r}, which this runtime does not have")
        if step.kernel in VIEWS:
            self.view_steps += 1
            return KERNELS[step.kernel]
        fn = self.own(index, step)
        if fn is None:
            reason = self.torch_ops.get(step.kernel, f"the artifact has no {self.name} kernel for this step")
            if self.strict:
                raise KernelError(f"step {index} ({step.kernel}): {reason} (strict: no fallback)")
            self.fallbacks.append({"step": index, "kernel": step.kernel, "reason": reason})
            return KERNELS[step.kernel]
        self.own_steps += 1
        return fn

    def steps(self, refused: int = 0) -> dict:
        """Steps by where they run (`refused`: own steps that fell back at run time)."""
        return {self.name: self.own_steps - refused, "torch": len(self.fallbacks), "views": self.view_steps}


class TritonKernels(ArtifactKernels):
    """Steps through the artifact's Triton launchers; the others (reported) as torch kernels."""

    name = "triton"

    def __init__(self, launchers: dict, launch: dict, *, strict: bool = False, toolchain_note: str | None = None):
        super().__init__(launch.get("torch_ops", {}), strict=strict)
        self.launchers, self.launch = launchers, launch
        self.notes = [toolchain_note] if toolchain_note else []

    def own(self, index: int, step: Step) -> Callable | None:
        launcher = self.launchers.get(step.kernel)
        if launcher is None:
            return None
        configs = self.launch.get("steps", {}).get(str(index), [{"max_tokens": None, "config": {}}])
        return _Launch(self, index, step, launcher, configs)

    def report(self) -> dict:
        """Steps by where they run, and every fallback with its reason."""
        return {"kernels": self.name, "steps": self.steps(self.refused), "tuning": self.launch.get("tuning", {}),
                "fallbacks": list(self.fallbacks), "notes": self.notes}


def cache_root() -> Path:
    return Path(os.environ.get("V4C_CACHE_DIR") or Path.home() / ".cache" / "v4c")


def _extract(store, files: dict) -> Path:
    """The package's files in a cache directory named by their hashes (written once, atomically)."""
    key = hashlib.sha256("".join(f"{rel}\0{meta['sha256']}\n" for rel, meta in sorted(files.items())).encode())
    dest = cache_root() / "triton-kernels" / key.hexdigest()[:32]
    if (dest / "__init__.py").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for rel in files:
        (tmp / rel[len(PACKAGE) + 1:]).write_bytes(store.read(rel))
    try:
        os.rename(tmp, dest)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _import_package(path: Path):
    name = f"_v4c_triton_kernels_{path.name}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def check_triton_device(device: str) -> None:
    """Raise naming what is missing for Triton kernels to run on `device`."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret and device != "cpu":
        raise ArtifactError(f"TRITON_INTERPRET=1 runs Triton kernels on the CPU, but the session's device is {device}")
    if not interpret and not device.startswith("cuda"):
        raise ArtifactError(
            f"this artifact's kernels are Triton kernels, which need a CUDA GPU (the session's device is {device}); "
            "run on a GPU (--device cuda), set TRITON_INTERPRET=1 to run them (slowly) on the CPU, or use "
            "--kernels torch to run the runtime's reference kernels instead")


def triton_kernels(store, manifest: dict, *, device: str = "cpu", strict: bool = False) -> TritonKernels:
    """The kernel set of a triton artifact (its files already verified against the manifest)."""
    check_triton_device(device)
    try:
        import triton
    except ImportError:
        raise ArtifactError("this artifact's kernels are Triton kernels and the triton package is not installed: "
                            "pip install 'v4c[triton]', or use --kernels torch") from None
    files = {rel: meta for rel, meta in manifest["files"].items() if rel.startswith(PACKAGE + "/")
             and rel.endswith(".py")}
    if f"{PACKAGE}/__init__.py" not in files or not store.exists(LAUNCH):
        raise ArtifactError(f"{store.label}: a triton artifact without its kernel package ({PACKAGE}/)")
    launch = json.loads(store.read(LAUNCH))
    if launch.get("format") != LAUNCH_FORMAT:
        raise ArtifactError(f"{LAUNCH}: format {launch.get('format')!r}; this runtime reads format {LAUNCH_FORMAT}")
    package = _import_package(_extract(store, files))
    built = manifest.get("target", {}).get("toolchain", {}).get("triton")
    note = None
    if built and built != triton.__version__:
        note = (f"kernels were compiled and tuned with triton {built}; this machine has {triton.__version__} "
                "(they are recompiled from source; the recorded launch configs may no longer be the fastest)")
        warnings.warn(f"v4c: {note}", RuntimeWarning, stacklevel=2)
    return TritonKernels(dict(package.LAUNCHERS), launch, strict=strict, toolchain_note=note)

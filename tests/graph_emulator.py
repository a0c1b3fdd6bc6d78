"""CUDA-graph semantics on the CPU, for tests of the executor's graph segments (runtime/executor.py).

A CUDA graph records the device work a piece of host code issues (kernels and their arguments, frozen)
and replays only that work: the host code does not run again. So a segment is safe to capture only if
its host code would issue the same work on every call. `EmulatedGraphs.capture` records what the
segment issues on the CPU, the way a capture would:
  - every aten op (TorchDispatchMode), with its arguments and outputs;
  - every Triton launch (the interpreter's `run`), with its grid and arguments (Python ints frozen);
and `replay` re-issues exactly those, writing into the tensors the capture produced. Host code that
depends on tensor values (a grid from `int(x.max())`, an id check, a list built with `.tolist()`)
is then frozen at its captured value, as on a GPU, and a test comparing replays with eager runs
catches it. Reading a value or an op whose output shape depends on values (nonzero, unique, bincount,
...) is refused outright, as a capture on a GPU would refuse it (or stall on a sync).

The capture also runs the work once (it must, to get shapes and values for the host code); a CUDA
capture runs nothing, so every tensor the recorded work touched (the arena, the KV state that stateful
steps at a device position update in place, ...) is restored afterwards. Capture and replay leave inference mode
(the executor's forward runs in it): there, composite ops such as `.to(dtype)`, `.contiguous()` and
`.reshape()` reach the dispatcher below the Python mode, so the recorder would miss their copies.
"""

import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from triton.runtime import interpreter

# ops whose output shape depends on tensor values: on a GPU they read a count back (a sync), so a capture fails
DATA_DEPENDENT = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount",
                  "repeat_interleave", "_local_scalar_dense", "equal", "is_nonzero"}


HOST_COPIES = ("tolist", "numpy")  # Tensor methods that read values without an aten op the recorder sees


class HostRead(RuntimeError):
    """Host code read a tensor value (or its values decide a shape) inside a graph segment."""


def _tensors(x) -> list:
    return [v for v in tree_leaves(x) if isinstance(v, torch.Tensor)]


class _Snapshots:
    """The contents of every storage the recorded work touches, taken before its first use, to undo the
    capture's run (a CUDA capture runs nothing)."""

    def __init__(self):
        self.saved: dict[int, tuple] = {}

    def take(self, *values) -> None:
        with _disable_current_modes():
            for t in _tensors(values):
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.saved and storage.nbytes():
                    self.saved[storage.data_ptr()] = (storage, storage.clone())

    def restore(self) -> None:
        with _disable_current_modes():
            for storage, copy in self.saved.values():
                storage.copy_(copy)


class _Recorder(TorchDispatchMode):
    def __init__(self, ops: list, snapshots: _Snapshots):
        super().__init__()
        self.ops, self.snapshots = ops, snapshots

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in DATA_DEPENDENT:
            raise HostRead(f"{func} inside a graph segment: its result depends on tensor values read on the host")
        self.snapshots.take(args, kwargs)
        out = func(*args, **kwargs)
        if func.is_view:  # an alias of a recorded tensor: nothing to redo
            return out
        if not _tensors(out) and out is not None:
            raise HostRead(f"{func} returned a host value ({out!r}) inside a graph segment")
        self.ops.append(("aten", func, args, kwargs, out))
        return out


def _redo_aten(func, args, kwargs, out):
    new = func(*args, **kwargs)
    for old, fresh in zip(_tensors(out), _tensors(new)):
        if old is not fresh and old.numel():
            old.copy_(fresh)


class EmulatedGraphs:
    """A capturer for `Session(graphs=...)` on the CPU (see the module docstring)."""

    def __init__(self):
        self.failed: list[str] = []
        self.captures = self.replays = 0

    def capture(self, run, arena: torch.Tensor):
        snapshots = _Snapshots()
        snapshots.take(arena)
        ops: list = []
        original = interpreter.InterpretedFunction.run
        reads = {name: getattr(torch.Tensor, name) for name in HOST_COPIES}
        inside = [False]  # in the interpreter, whose own reads of tensors are not the segment's

        def recorded_run(fn, *args, grid, warmup, **kwargs):
            if not warmup:
                ops.append(("triton", fn, args, {"grid": grid, **kwargs}, None))
                snapshots.take(args, kwargs)
            # the interpreter's own tensor work is not device work (and it writes every argument back,
            # inference tensors such as the plan's positions included)
            inside[0] = True
            try:
                with _disable_current_modes(), torch.inference_mode():
                    return original(fn, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                inside[0] = False

        def refused(name):
            def read(t, *args, **kwargs):
                if not inside[0]:
                    raise HostRead(f"Tensor.{name}() inside a graph segment copies tensor values to the host")
                return reads[name](t, *args, **kwargs)
            return read

        interpreter.InterpretedFunction.run = recorded_run
        for name in HOST_COPIES:
            setattr(torch.Tensor, name, refused(name))
        try:
            with torch.inference_mode(False), _Recorder(ops, snapshots):
                run()
        finally:
            interpreter.InterpretedFunction.run = original
            for name, fn in reads.items():
                setattr(torch.Tensor, name, fn)
        snapshots.restore()
        self.captures += 1

        def replay():
            self.replays += 1
            with torch.inference_mode(False):
                for kind, fn, args, kwargs, out in ops:
                    if kind == "triton":
                        with torch.inference_mode():
                            original(fn, *args, warmup=False, **kwargs)
                    else:
                        _redo_aten(fn, args, kwargs, out)
        return replay

"""The executor: runs a `Program` over a session's incremental state.

A `Session` holds the state slots for `batch` sequences that advance together (same length,
same positions), a position counter, and one activation arena allocated up front from the
compile-time memory plan (bytes_per_token x batch x prefill_chunk). `forward(tokens)` feeds the
next tokens (a prefill of any length, fed prefill_chunk at a time, or one decode step) and
returns their next-token logits. Every value the program computes is written into its planned
buffer in the arena; only the kernels' own temporaries are allocated per call.

The decode loop makes no per-op decisions: for each call shape (tokens per sequence) the session
plans once a flat list of (function, arguments, keywords) over fixed tensors (arena views, weights,
state), with views folded away and row blocks chosen, and a call runs that list. A kernel with a
`bind(inputs, outs, attrs)` method (the tvm kernels; the triton launchers, through their `into`) gives its
own entries, writing straight into the planned buffers; any other kernel's result is copied into its
buffer. With an observer (calibration, debugging) the steps run one by one as values instead.

With `graphs` (CUDA), each run of consecutive entries that make no per-call host decision (every
own-kernel step; see `graph_safe`) is captured once as a CUDA graph and replayed from then on: the first
call of a shape runs eagerly (Triton compiles its kernels), the second captures and replays, later calls
replay. The stateful steps (attention, compress, index_topk) depend on the session position: in a decode
step their triton launchers read it on the device from the plan's positions tensor (`_device_position`),
so their launches are the same at every position and a decode step over dense state is one graph replay;
otherwise (prefill chunks, tiered stores, kernels that cannot) the host hands them `pos0` each call and
they run between segments. A capture that fails is reported (`graph_report`) and its segment runs eagerly.
"""

from collections.abc import Callable, Mapping

import torch

from .dtypes import torch_dtype
from .errors import ArtifactError, InputError
from .kernels import ATTENTION, STATEFUL
from .kernelset import VIEWS, TorchKernels
from .kv_tiers import PagedEntries, PagePool, Prefetcher, TierAllocator, TierStats
from .program import Program, Step

Observer = Callable[[int, Step, list, tuple], None]  # (step index, step, inputs, outputs)


def _concrete(shape, **dims) -> list[int]:
    return [dims[d] if isinstance(d, str) else d for d in shape]


class Tiers:
    """The allocators of the KV tiers (shared by the sessions of one process) and their traffic."""

    def __init__(self, device: int | None = None, host: int | None = None, where: str = "cpu"):
        self.device = TierAllocator("device", device, where)
        self.host = TierAllocator("host", host, "cpu", pinned=where.startswith("cuda"))
        self.stats = TierStats()

    @classmethod
    def for_program(cls, program: Program, where: str = "cpu") -> "Tiers":
        budgets = (program.kv_plan or {}).get("budgets", {})
        return cls(budgets.get("device"), budgets.get("host"), where)

    def report(self) -> dict:
        return {"device": self.device.report(), "host": self.host.report(), "traffic": self.stats.report()}


class Session:
    """`kernels` picks the function of every step (default: the torch kernels); `device` is where
    weights (already there), activations and the device KV tier live."""

    def __init__(self, program: Program, weights: Mapping[str, torch.Tensor], batch: int = 1,
                 kernels=None, tiers: Tiers | None = None, device: str = "cpu", graphs=False):
        if batch < 1:
            raise InputError(f"batch = {batch}: must be at least 1")
        if graphs is True:
            if not device.startswith("cuda"):
                raise InputError(f"CUDA graphs need a CUDA device; the session's device is {device}")
            graphs = CudaGraphs()
        self.graphs = graphs or None  # a capturer (CudaGraphs, or a test's stand-in), or None
        self.program = program
        self.batch = batch
        self.pos = 0
        self.device = device
        self.kernels = kernels or TorchKernels()
        self.tiers = tiers or Tiers.for_program(program, device)
        kv = program.kv_plan or {}
        plan, pool = kv.get("slots", {}), None
        self.state = {}
        for name, spec in program.states.items():
            shape, dtype, slot = _concrete(spec.shape, B=batch), torch_dtype(spec.dtype), plan.get(name, {})
            if slot.get("tier") == "host":
                if pool is None:  # one device page pool for all tiered layers (their pages have one shape)
                    pool = PagePool(kv["page_cache_pages"] * batch, (slot["page_entries"], shape[2]), dtype,
                                    self.tiers.device, self.tiers.stats)
                self.state[name] = PagedEntries(name, batch, shape[1], shape[2], dtype, slot["page_entries"], pool,
                                                self.tiers.host)
            else:
                self.state[name] = self.tiers.device.alloc(shape, dtype, name)
        self.paged = [t for t in self.state.values() if isinstance(t, PagedEntries)]
        self.prefetcher = Prefetcher(self.paged)
        self.arena = torch.empty(program.arena_bytes(batch), dtype=torch.uint8, device=device)
        missing = sorted(set(program.params) - set(weights))
        if missing:
            raise InputError(f"weights missing for {len(missing)} parameters, e.g. {missing[:3]}")
        buffers = {int(slot): b for slot, b in program.memory["buffers"].items()}
        self._steps = []
        for index, step in enumerate(program.steps):
            fn = self.kernels.resolve(index, step)
            args = [weights[a[1:]] if isinstance(a, str) else a for a in step.inputs]
            attrs = dict(step.attrs)
            if step.kernel in STATEFUL:
                attrs["state"] = tuple(self.state[name] for name in step.state)
            outs = [buffers.get(slot) for slot in step.outputs]
            tiered = next((self.state[n] for n in step.state if isinstance(self.state[n], PagedEntries)), None)
            if step.kernel not in ATTENTION:
                tiered = None  # prefetch the next tiered layer once this layer has read its own
            self._steps.append((fn, step.kernel in STATEFUL, args, step.outputs, outs, attrs, tiered))
        self._plans: dict[int, _Plan] = {}
        embed = program.params.get("embed_tokens.weight")
        self.vocab_size = embed.shape[0] if embed is not None else None

    @property
    def remaining(self) -> int:
        """Tokens this session can still take before reaching the planned context."""
        return self.program.max_context - self.pos

    def reset(self) -> None:
        self.prefetcher.wait()
        for t in self.state.values():
            t.reset() if isinstance(t, PagedEntries) else t.zero_()
        self.pos = 0

    def close(self) -> None:
        self.prefetcher.close()

    def export_state(self) -> dict[str, torch.Tensor]:
        """Every state slot's contents (compressed entries: only the rows written so far)."""
        self.prefetcher.wait()
        out = {}
        for name, t in self.state.items():
            rate = self._rates.get(name)
            rows = self.pos // rate if rate else None
            full = t.read(t.flat_host.shape[1]) if isinstance(t, PagedEntries) else t
            out[name] = (full[:, :rows] if rows is not None else full).contiguous()
        return out

    def import_state(self, state: Mapping[str, torch.Tensor], pos: int) -> None:
        """Restore what `export_state` returned (after `reset`); the session continues at `pos`."""
        self.reset()
        for name, rows in state.items():
            t = self.state[name]
            if isinstance(t, PagedEntries):
                t.write(0, rows)
            else:
                t[:, :rows.shape[1]] = rows
        self.pos = pos

    @property
    def _rates(self) -> dict[str, int]:
        """Growing state slots (compressed entries) -> tokens per entry."""
        rates = {}
        for step in self.program.steps:
            if step.kernel == "compress":
                rates[step.state[-1]] = step.attrs["rate"]
            elif step.kernel == "compress_pair":  # the first's slots (its entries last), then the second's
                n = 5 if step.attrs["first"]["overlap"] else 3
                rates[step.state[n - 1]] = step.attrs["first"]["rate"]
                rates[step.state[-1]] = step.attrs["second"]["rate"]
        return rates

    def check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2 or tokens.shape[0] != self.batch:
            raise InputError(f"tokens must have shape [batch={self.batch}, length], got {list(tokens.shape)}")
        if tokens.shape[1] == 0:
            raise InputError("no tokens given: the prompt is empty")
        if self.vocab_size is not None:
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.vocab_size:
                raise InputError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {self.vocab_size})")
        if tokens.shape[1] > self.remaining:
            raise InputError(
                f"{self.pos + tokens.shape[1]} tokens exceed the artifact's planned context of "
                f"{self.program.max_context} tokens (kv.max_context in model.yaml); shorten the prompt "
                "or recompile with a larger kv.max_context")

    def _buffer(self, spec: dict, tokens: int, seq: int) -> torch.Tensor:
        start = spec["offset"] * tokens
        raw = self.arena[start:start + spec["bytes"] * tokens]
        with torch.inference_mode(False):  # a plain view of the arena (a dtype view made in inference mode is
            # an inference tensor, which code outside it, such as tests/graph_emulator.py, may not write)
            return raw.view(torch_dtype(spec["dtype"])).view(_concrete(spec["shape"], B=self.batch, S=seq))

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, observer: Observer | None = None) -> torch.Tensor:
        """tokens: [B, S] int64 -> logits [B, S, V] float32; advances the session by S tokens."""
        where = tokens.device if isinstance(tokens, torch.Tensor) else "cpu"
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=where)
        self.check_tokens(tokens)  # where they are: ids from the host are checked before they reach a GPU
        tokens = tokens.to(self.device)
        chunk = self.program.prefill_chunk
        parts = [self._step(tokens[:, i:i + chunk], observer) for i in range(0, tokens.shape[1], chunk)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _step(self, tokens: torch.Tensor, observer: Observer | None) -> torch.Tensor:
        if observer is not None:
            return self._observed_step(tokens, observer)
        seq = tokens.shape[1]
        plan = self._plans.get(seq)
        if plan is None:
            plan = self._plans[seq] = self._plan(seq)
        plan.tokens.copy_(tokens)
        torch.arange(self.pos, self.pos + seq, out=plan.positions, device=plan.positions.device)
        for kw in plan.stateful:
            kw["pos0"] = self.pos
        for fn, args, kw in plan.entries:
            fn(*args, **kw)
        self.pos += seq
        return plan.output.clone()  # the arena is reused by the next call

    def _plan(self, seq: int) -> "_Plan":
        """The flat call list for calls of `seq` tokens per sequence: every value is a fixed tensor."""
        n = self.batch * seq
        values: list = [None] * self.program.num_values
        tokens = torch.zeros(self.batch, seq, dtype=torch.long, device=self.device)
        positions = torch.zeros(seq, dtype=torch.long, device=self.device)
        values[self.program.inputs["tokens"]], values[self.program.inputs["positions"]] = tokens, positions
        entries, stateful, labels, safe = [], [], [], []
        for step, (fn, is_stateful, args, outputs, outs, attrs, tiered) in zip(self.program.steps, self._steps):
            inputs = [values[a] if isinstance(a, int) else a for a in args]
            if step.kernel in VIEWS:  # a view of a fixed tensor is fixed: folded into the plan
                values[outputs[0]] = fn(*inputs, **attrs)
                continue
            if any(spec is None for spec in outs):
                raise ArtifactError(f"program step {step.kernel} has an output without a planned buffer "
                                    "(plans/memory.json): recompile the artifact")
            buffers = [self._buffer(spec, n, seq) for spec in outs]
            kw = dict(attrs)
            on_device = is_stateful and self._device_position(fn, kw, seq)
            if on_device:
                kw["pos0"] = positions  # its first element is the call's position, read by the kernels
            elif is_stateful:
                kw["pos0"] = self.pos
                stateful.append(kw)
            bind = getattr(fn, "bind", None)
            bound = bind(inputs, buffers, kw) if bind is not None else None
            labels.extend([f"bound:{step.kernel}"] * len(bound) if bound is not None else [f"py:{step.kernel}"])
            entries.extend(bound if bound is not None else [(_into(fn, buffers), inputs, kw)])
            safe.extend([graph_safe(fn) and (on_device or not is_stateful)] * (len(bound) if bound is not None else 1))
            for slot, buffer in zip(outputs, buffers):
                values[slot] = buffer
            if tiered is not None:
                entries.append((self.prefetcher.after, (tiered,), {}))
                labels.append("prefetch")
                safe.append(False)
        if self.graphs is not None:
            entries, labels = _segments(entries, labels, safe, self.graphs, self.arena)
        return _Plan(entries, stateful, tokens, positions, values[self.program.output], labels)

    def _device_position(self, fn, kw: dict, seq: int) -> bool:
        """Whether a stateful step of a call of `seq` tokens a sequence reads its position on the device (the
        plan's positions tensor) instead of being handed `pos0` by the host each call: with graphs, for a
        decode step (seq 1), where the kernel can (`device_position`: the triton launchers size their grids by
        the state's capacity, so their launches are the same at every position and the step joins a graph)
        and its state is dense (a tiered store is read and written from the host)."""
        return (self.graphs is not None and seq == 1 and bool(getattr(fn, "device_position", False))
                and all(isinstance(t, torch.Tensor) for t in kw["state"]))

    def graph_report(self) -> dict | None:
        """With graphs: per planned call shape, the host calls a step makes (graph replays + other
        entries) against the entries it replaces, and any capture that failed."""
        if self.graphs is None:
            return None
        shapes = {}
        for seq, plan in self._plans.items():
            segs = [fn for fn, _, _ in plan.entries if isinstance(fn, _Segment)]
            shapes[str(seq)] = {"host_calls": len(plan.entries), "graphs": len(segs),
                                "entries_in_graphs": sum(len(g.entries) for g in segs),
                                "entries": len(plan.entries) - len(segs) + sum(len(g.entries) for g in segs)}
        return {"shapes": shapes, "failed": list(self.graphs.failed)}

    def _observed_step(self, tokens: torch.Tensor, observer: Observer) -> torch.Tensor:
        seq = tokens.shape[1]
        n = self.batch * seq
        values: list = [None] * self.program.num_values
        values[self.program.inputs["tokens"]] = tokens
        values[self.program.inputs["positions"]] = torch.arange(self.pos, self.pos + seq, device=self.device)
        for i, (fn, stateful, args, outputs, outs, attrs, tiered) in enumerate(self._steps):
            inputs = [values[a] if isinstance(a, int) else a for a in args]
            result = fn(*inputs, pos0=self.pos, **attrs) if stateful else fn(*inputs, **attrs)
            result = result if isinstance(result, tuple) else (result,) if outputs else ()
            for slot, value, spec in zip(outputs, result, outs):
                if spec is not None:  # a planned buffer (views share their operand's)
                    buffer = self._buffer(spec, n, seq)
                    buffer.copy_(value)
                    value = buffer
                values[slot] = value
            if tiered is not None:
                self.prefetcher.after(tiered)
            if observer is not None:
                observer(i, self.program.steps[i], inputs, result)
        self.pos += seq
        return values[self.program.output].clone()  # the arena is reused by the next call


class _Plan:
    """One call shape's flat call list; `stateful`: the keyword dicts whose pos0 each call sets."""

    def __init__(self, entries: list, stateful: list[dict], tokens, positions, output, labels: list[str]):
        self.entries, self.stateful = entries, stateful
        self.tokens, self.positions, self.output = tokens, positions, output
        self.labels = labels  # per entry: "<bound|py>:<op>" (profiling)


def graph_safe(fn) -> bool:
    """Whether `fn` (a plan entry's function) makes no per-call host decision, so that replaying what it
    launched once is the same as calling it again: own kernels that say so (`fn.graph_safe`, e.g. a Triton
    launch with fixed configs and no host reads of tensor values); never a torch kernel (they read
    values on the host, e.g. the experts' ids)."""
    return bool(getattr(fn, "graph_safe", False))


class CudaGraphs:
    """Captures segments as CUDA graphs sharing one memory pool (segments replay in the order they were
    captured, never concurrently, so their temporaries may share memory)."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()
        self.failed: list[str] = []

    def capture(self, run, arena: torch.Tensor):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            run()
        return graph.replay


class _Segment:
    """Consecutive graph-safe entries run as one captured graph: eagerly on the first call (kernels compile),
    captured and replayed on the second, replayed after. A capture that raises is reported and the
    segment stays eager."""

    def __init__(self, entries: list, graphs, arena: torch.Tensor):
        self.entries, self.graphs, self.arena = entries, graphs, arena
        self.replay, self.warm, self.eager = None, False, False  # eager: its capture failed

    def run(self):
        for fn, args, kw in self.entries:
            fn(*args, **kw)

    def __call__(self):
        if self.replay is None and self.warm and not self.eager:
            try:
                self.replay = self.graphs.capture(self.run, self.arena)
            except Exception as e:  # noqa: BLE001 - any capture failure: report it, stay eager
                self.graphs.failed.append(f"{len(self.entries)} entries: {type(e).__name__}: {e}")
                self.eager = True
        self.warm = True
        (self.replay or self.run)()


def _segments(entries: list, labels: list[str], safe: list[bool], graphs, arena) -> tuple[list, list[str]]:
    """The plan's entries with every run of >= 2 consecutive graph-safe ones replaced by one `_Segment`."""
    out, out_labels, i = [], [], 0
    while i < len(entries):
        j = i
        while j < len(entries) and safe[j]:
            j += 1
        if j - i >= 2:
            out.append((_Segment(entries[i:j], graphs, arena), (), {}))
            out_labels.append(f"graph:{j - i}")
            i = j
        else:
            out.append(entries[i])
            out_labels.append(labels[i])
            i += 1
    return out, out_labels


def _into(fn, buffers: list[torch.Tensor]):
    """fn, with its results copied into the planned buffers."""
    if not buffers:
        return fn
    if len(buffers) == 1:
        out = buffers[0]

        def run_one(*args, **kw):
            out.copy_(fn(*args, **kw))
        return run_one

    def run(*args, **kw):
        for buffer, value in zip(buffers, fn(*args, **kw)):
            buffer.copy_(value)
    return run

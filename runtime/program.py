"""`Program`: the lowered kernel list that an artifact ships and the executor runs.

A program is flat: numbered value slots, named parameters (weights), named state slots
(incremental KV / compressor state, shapes with the symbolic batch `B`), and a list of steps,
each calling one kernel. The compiler writes it as `program.json`; nothing here knows the IR.
"""

import json
from dataclasses import asdict, dataclass, field

PROGRAM_FORMAT = 1


@dataclass
class Step:
    kernel: str
    inputs: list  # int value slot, or "@name" for a parameter
    outputs: list[int]
    attrs: dict = field(default_factory=dict)
    state: list[str] = field(default_factory=list)


@dataclass
class TensorSpec:
    shape: list  # ints and symbols ("B", "S")
    dtype: str


@dataclass
class Program:
    inputs: dict[str, int]  # graph input name -> value slot ("tokens", "positions")
    output: int  # value slot of the logits
    steps: list[Step]
    params: dict[str, TensorSpec]
    states: dict[str, TensorSpec]
    max_context: int  # tokens a session can hold; state capacities are sized for it
    num_values: int
    prefill_chunk: int  # most tokens per forward step; longer inputs are fed in chunks
    # activation arena: bytes_per_token, and per value slot ("3") its offset / bytes per token, shape, dtype
    memory: dict
    # KV tiers: {"budgets": {"device", "host"}, "slots": {state: {"tier", "page_entries", "cache_pages"}}};
    # None: every state slot on the device tier, unbudgeted
    kv_plan: dict | None = None
    format: int = PROGRAM_FORMAT

    def arena_bytes(self, batch: int, tokens: int | None = None) -> int:
        """Arena size for `batch` sequences fed `tokens` (default: prefill_chunk) at a time."""
        return self.memory["bytes_per_token"] * batch * (tokens or self.prefill_chunk)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Program":
        d = json.loads(text)
        if d.get("format") != PROGRAM_FORMAT:
            raise ValueError(f"program format {d.get('format')!r}; this runtime reads format {PROGRAM_FORMAT}")
        d["steps"] = [Step(**s) for s in d["steps"]]
        d["params"] = {k: TensorSpec(**v) for k, v in d["params"].items()}
        d["states"] = {k: TensorSpec(**v) for k, v in d["states"].items()}
        return cls(**d)

"""V4's cache families: which state slot is which kind of incremental state, and what it costs.

    sliding ring       per layer, the last window-1 tokens' KV: fixed size, read whole every step
    CSA entries        one entry per `rate` tokens, read where the indexer picks
    CSA indexer keys   one key per `rate` tokens, read whole every step (to score)
    HCA entries        one entry per `rate'` tokens, read whole every step
    compressor buffers the open window's projections (and CSA's overlap slice): fixed size
"""

import re

from .config import ModelConfig
from .dtypes import torch_dtype

FAMILIES = ("sliding ring", "CSA entries", "CSA indexer keys", "HCA entries", "compressor buffers")
_LAYER = re.compile(r"^layers\.(\d+)\.")


def family_of(name: str, config: ModelConfig) -> str:
    m = _LAYER.match(name)
    kind = config.attention[int(m.group(1))] if m else None
    if name.endswith(".ring"):
        return "sliding ring"
    if name.endswith(".compressor.indexer.entries"):
        return "CSA indexer keys"
    if name.endswith(".compressor.entries"):
        return "CSA entries" if kind == "csa" else "HCA entries"
    return "compressor buffers"


def _entry_bytes(spec: dict) -> int:
    n = torch_dtype(spec["dtype"]).itemsize
    for d in spec["shape"][2:]:
        n *= d
    return n


def cache_families(config: ModelConfig, states: dict[str, dict], max_context: int) -> dict[str, dict]:
    """Per family: layers, bytes per token of context (for growing families), fixed bytes per
    sequence (ring and buffers), and bytes per sequence at `max_context`. `states`: name ->
    {"shape": [B, n, ...], "dtype"}."""
    out = {f: {"layers": set(), "bytes_per_token": 0.0, "fixed_bytes": 0, "bytes_at_max_context": 0} for f in FAMILIES}
    for name, spec in states.items():
        fam, layer = family_of(name, config), int(_LAYER.match(name).group(1))
        row = out[fam]
        row["layers"].add(layer)
        entry = _entry_bytes(spec)
        if fam in ("CSA entries", "CSA indexer keys", "HCA entries"):
            rate = config.compress_rates[layer]
            row["bytes_per_token"] += entry / rate
            row["bytes_at_max_context"] += entry * (max_context // rate)
        else:
            row["fixed_bytes"] += entry * spec["shape"][1]
            row["bytes_at_max_context"] += entry * spec["shape"][1]
    return {f: {**row, "layers": len(row["layers"])} for f, row in out.items() if row["layers"]}

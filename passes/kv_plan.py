"""Plan where every layer's KV state lives: bytes per token, tier, pages, prefetch, traffic.

Per cache family (see runtime/kv.py) and layer, for `concurrency` sequences of `max_context` tokens:
- what is read whole every decode step (sliding ring, compressor buffers, indexer keys, HCA
  entries) stays on the device tier;
- CSA entries stay on the device when the budget allows; otherwise all their pages live on the host
  tier and the device keeps a page cache. Each step fetches only the pages holding the indexer's
  picks (at most index_topk pages per layer: the worst case the plan predicts), and the next CSA
  layer's pages are prefetched while the current layer computes;
- the disk tier holds saved sessions.
A spec that cannot fit fails with the largest context (at this concurrency) and the largest
concurrency (at this context) that would.
"""

from pydantic import BaseModel, ConfigDict, Field

from v4c.ir import Module
from v4c.runtime.config import ModelConfig
from v4c.runtime.dtypes import torch_dtype
from v4c.runtime.errors import V4CError
from v4c.runtime.kv import family_of

GROWING = ("CSA entries", "CSA indexer keys", "HCA entries")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    concurrency: int = Field(1, ge=1)
    page_tokens: int = Field(64, ge=1)
    device: int | None = None  # bytes; None: unlimited
    host: int | None = None
    disk: int | None = None


class PlanError(V4CError):
    pass


def _slots(m: Module, context: int) -> list[dict]:
    """Per state slot, for one sequence of `context` tokens: family, layer, entry bytes, entries."""
    cfg = ModelConfig.from_dict(m.config)
    rows = []
    for name, t in m.states.items():
        fam, layer = family_of(name, cfg), int(name.split(".")[1])
        entry = torch_dtype(t.dtype).itemsize
        for d in t.shape[2:]:
            entry *= d
        rate = cfg.compress_rates[layer] if fam in GROWING else 1
        entries = context // rate if fam in GROWING else t.shape[1]
        rows.append({"state": name, "family": fam, "layer": layer, "entry_bytes": entry, "tokens_per_entry": rate,
                     "entries": entries, "bytes": entry * entries})
    return rows


def _assign(slots: list[dict], o: Options, topk: int) -> tuple[dict, str | None]:
    """Tiers for `concurrency` sequences; -> (totals, why it does not fit or None)."""
    c = o.concurrency
    total = c * sum(s["bytes"] for s in slots)
    for s in slots:
        s.update(tier="device", page_entries=None, prefetch_depth=0, bytes_per_step=0)
    if o.device is None or total <= o.device:
        return {"device": total, "host": 0, "page_cache_pages": 0}, None
    csa = [s for s in slots if s["family"] == "CSA entries"]
    fixed = c * sum(s["bytes"] for s in slots if s["family"] != "CSA entries")
    host = c * sum(s["bytes"] for s in csa)
    if not csa or fixed >= o.device:
        return {"device": total, "host": 0}, (f"the device tier ({o.device:,} bytes) cannot hold what every step reads "
                                              f"whole ({fixed:,} bytes for {c} sequences)")
    if o.host is not None and host > o.host:
        return {"device": fixed, "host": host}, f"the host tier ({o.host:,} bytes) cannot hold the CSA entries ({host:,})"
    shapes = {(s["entry_bytes"], max(1, o.page_tokens // s["tokens_per_entry"])) for s in csa}
    if len(shapes) != 1:
        return {"device": fixed, "host": host}, "the CSA layers' pages differ in shape; one page pool needs one"
    entry, pe = shapes.pop()
    pool_pages = (o.device - fixed) // (c * entry * pe)  # per sequence, shared by all CSA layers
    if pool_pages < 1:
        return {"device": fixed, "host": host}, (f"after {fixed:,} bytes of always-read state, the device tier has no "
                                                 f"room for one {o.page_tokens}-token page of CSA entries per sequence")
    for s in csa:
        s.update(tier="host", page_entries=pe, prefetch_depth=1,
                 bytes_per_step=min(topk, -(-s["entries"] // pe)) * pe * entry)
    return {"device": fixed + c * pool_pages * entry * pe, "host": host, "page_cache_pages": int(pool_pages)}, None


def plan(m: Module, o: Options, context: int | None = None) -> dict:
    """The KV plan of `m` for `context` tokens (default: the module's max_context)."""
    context = context or m.max_context
    topk = m.config["index_topk"]
    slots = _slots(m, context)
    totals, problem = _assign(slots, o, topk)
    if problem:
        raise PlanError(f"KV plan does not fit: {problem}. {_what_fits(m, o, context, topk)}")
    session_bytes = sum(s["bytes"] for s in slots)
    return {
        "context": context, "concurrency": o.concurrency, "page_tokens": o.page_tokens,
        "budgets": {"device": o.device, "host": o.host, "disk": o.disk},
        "totals": {k: totals[k] for k in ("device", "host")},
        "page_cache_pages": totals["page_cache_pages"],  # per sequence, shared by the tiered layers
        "session_bytes": session_bytes,
        "sessions_on_disk": None if o.disk is None else o.disk // max(session_bytes, 1),
        "bytes_per_decode_step": o.concurrency * sum(s["bytes_per_step"] for s in slots),
        "slots": {s.pop("state"): s for s in slots},
    }


def _fits(m: Module, o: Options, context: int, concurrency: int, topk: int) -> bool:
    return _assign(_slots(m, context), o.model_copy(update={"concurrency": concurrency}), topk)[1] is None


def _what_fits(m: Module, o: Options, context: int, topk: int) -> str:
    lo, hi = 0, context  # largest context that fits at this concurrency
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _fits(m, o, mid, o.concurrency, topk) else (lo, mid - 1)
    conc = o.concurrency
    while conc > 0 and not _fits(m, o, context, conc, topk):
        conc -= 1
    return (f"At concurrency {o.concurrency} the largest context that fits is {lo:,} tokens; at {context:,} tokens "
            f"the largest concurrency that fits is {conc}" + ("" if conc else " (none)") + ".")


def run(m: Module, options: Options, progress=None) -> Module:
    out = m.replace()
    out.plans["kv"] = plan(m, options)
    p = out.plans["kv"]
    out.counters["kv_plan"] = {"device_bytes": p["totals"]["device"], "host_bytes": p["totals"]["host"],
                               "host_slots": sum(s["tier"] == "host" for s in p["slots"].values()),
                               "bytes_per_decode_step": p["bytes_per_decode_step"]}
    return out

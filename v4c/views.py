"""Terminal views for the CLI: the progress bar, and the tables of `inspect` and `plan`."""

import sys


class progress_bar:
    """A rich progress bar on stderr when it is a terminal; nothing otherwise."""

    def __init__(self, quiet: bool):
        self.enabled = not quiet and sys.stderr.isatty()
        self.bar, self.tasks = None, {}

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
        from rich.console import Console
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=True)
        self.bar.start()
        return self.update

    def update(self, task: str, done: int, total: int):
        if task not in self.tasks:
            self.tasks[task] = self.bar.add_task(task, total=total)
        self.bar.update(self.tasks[task], completed=done)

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()



def mib(n) -> str:
    if n >= 2**30:
        return f"{n / 2**30:,.3f} GiB"
    return f"{n / 2**20:,.2f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def print_description(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    con, m = Console(), info["model"]
    con.print(f"[bold]{info['artifact']}[/] (format {info['format_version']}, v4c {info['producer']['version']}, "
              f"target {info['target']['name']}{', signed' if info['signed'] else ''})")
    con.print(f"model: {m['layers']} layers {m['attention']}, MoE {m['mlp']} with {m['routed_experts']} experts "
              f"(top {m['experts_per_token']}), hidden {m['hidden_size']}, {m['heads']} heads x {m['head_dim']}, "
              f"mHC x{m['hc_mult']}, vocab {m['vocab_size']}, {m['parameters']:,} parameters")
    con.print(f"source: {info['source']}")
    con.print("pipeline: " + " -> ".join(p["name"] for p in info["pipeline"]))
    dtypes = sorted(info["weights"]["by_dtype"])
    t = Table("component", *dtypes, "total", title=f"weights: {mib(info['weights']['total_bytes'])}")
    for comp, row in info["weights"]["by_component"].items():
        t.add_row(comp, *[mib(row[d]) if d in row else "" for d in dtypes], mib(sum(row.values())))
    con.print(t)
    kv = info["kv"]
    t = Table("cache family", "layers", "bytes / token", "fixed bytes", f"at {kv['max_context']} tokens",
              title=f"KV per sequence: {kv['bytes_per_token']:,.1f} bytes/token + {mib(kv['fixed_bytes'])} fixed")
    for fam, row in kv["families"].items():
        t.add_row(fam, str(row["layers"]), f"{row['bytes_per_token']:,.1f}", mib(row["fixed_bytes"]),
                  mib(row["bytes_at_max_context"]))
    con.print(t)
    mem = info["plans"]["memory"]
    if mem:
        con.print(f"memory plan: {mem['bytes_per_token']:,} bytes/token of activations "
                  f"({mem['bytes_per_token_without_reuse']:,} without reuse); arena {mib(mem['arena_bytes_batch1'])} "
                  f"at batch 1, {mem['prefill_chunk']} tokens per step")
    con.print(f"report: {info['report'] or 'none (no calibration in this build)'}")



def print_plan(p: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    fams = {}
    for s in p["slots"].values():
        f = fams.setdefault(s["family"], {"layers": set(), "entry": set(), "per_token": 0.0, "fixed": 0, "bytes": 0,
                                          "tiers": set(), "pages": set(), "step": 0})
        f["layers"].add(s["layer"])
        f["entry"].add(s["entry_bytes"])
        f["tiers"].add(s["tier"])
        f["bytes"] += s["bytes"]
        f["step"] += s["bytes_per_step"]
        if s["page_entries"]:
            f["pages"].add(f"{s['page_entries']} entries; pool of {p['page_cache_pages']} per sequence")
        if s["family"] in ("CSA entries", "CSA indexer keys", "HCA entries"):
            f["per_token"] += s["entry_bytes"] / s["tokens_per_entry"]
        else:
            f["fixed"] += s["bytes"]
    c = p["concurrency"]
    t = Table("cache family", "layers", "bytes / entry", "bytes / token", "fixed bytes", f"at {p['context']:,} tokens",
              "tier", "pages", "bytes moved / step",
              title=f"KV plan: {p['context']:,} tokens x {c} sequence{'s' * (c > 1)}, pages of {p['page_tokens']} tokens")
    for name, f in fams.items():
        t.add_row(name, str(len(f["layers"])), "/".join(str(e) for e in sorted(f["entry"])),
                  f"{f['per_token']:,.2f}" if f["per_token"] else "", f"{f['fixed']:,}" if f["fixed"] else "",
                  mib(f["bytes"]), "/".join(sorted(f["tiers"])), "; ".join(sorted(f["pages"])) or "",
                  f"{f['step']:,}" if f["step"] else "")
    con = Console()
    con.print(t)
    device_budget = p["budgets"]["device"]
    of_budget = "" if device_budget is None else f" of {mib(device_budget)}"
    con.print(f"per sequence: {mib(p['session_bytes'])}; for {c}: device {mib(p['totals']['device'])}{of_budget}"
              f", host {mib(p['totals']['host'])}; worst-case host->device traffic per decode step "
              f"{p['bytes_per_decode_step']:,} bytes"
              + ("" if p["sessions_on_disk"] is None else f"; the disk tier holds {p['sessions_on_disk']:,} saved sessions"))


def print_bench(r: dict) -> None:
    """`v4c bench` as a table: medians (min-max) per system, then bandwidth and ratios."""
    from rich.console import Console
    from rich.table import Table

    def cell(s: dict, scale: float = 1.0, fmt: str = "{:,.1f}") -> str:
        return f"{fmt.format(s['median'] * scale)} ({fmt.format(s['min'] * scale)}-{fmt.format(s['max'] * scale)})"

    t = Table("system", "prefill tok/s", "TTFT ms", "decode tok/s", "step ms", "peak RSS MiB",
              title=f"batch {r['batch']}, context {r['context']:,}, {r['new_tokens']} new tokens: median (min-max) "
                    f"of {r['runs']} runs")
    for name, s in r["systems"].items():
        t.add_row(name, cell(s["prefill_tokens_per_s"]), cell(s["ttft_s"], 1e3), cell(s["decode_tokens_per_s"]),
                  cell(s["decode_step_s"], 1e3, "{:,.2f}"), cell(s["peak_rss_bytes"], 2**-20, "{:,.0f}"))
    con = Console(width=max(Console().width, 132))
    con.print(t)
    v = r["systems"]["v4c"]
    moved = r["decode_bytes_per_step"]
    con.print(f"decode step reads {mib(moved['weight_bytes'])} of weights and {mib(moved['kv_bytes'])} of KV: "
              f"{v['achieved_bytes_per_s'] / 1e9:.2f} GB/s achieved, {v['fraction_of_bandwidth']:.0%} of the measured "
              f"{r['memory_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s copy bandwidth (median of "
              f"{len(r.get('memory_bandwidth_samples', [0]))}; {v.get('fraction_of_best_copy', 0):.0%} of the fastest)")
    if "decode_speedup_vs_best_transformers" in r:
        con.print(f"decode {r['decode_speedup_vs_best_transformers']:.2f}x the faster transformers eager dtype; "
                  f"peak RSS {r['peak_rss_vs_transformers_bf16']:.2f}x transformers bf16")
    fallbacks = v["kernels"].get("fallbacks") or []
    if fallbacks:
        by_op: dict[str, int] = {}
        for f in fallbacks:
            by_op[f["kernel"]] = by_op.get(f["kernel"], 0) + 1
        con.print(f"{len(fallbacks)} steps ran as torch kernels (no {v['kernels']['kernels']} kernel): "
                  + ", ".join(f"{op} x{n}" for op, n in sorted(by_op.items())))

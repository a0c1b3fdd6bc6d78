"""`v4c bench`: prefill and decode speed of an artifact, side by side with transformers eager.

Every measurement runs in a fresh child process (`python -m v4c.bench child ...`), so its peak RSS
(the process high-water mark) is its own and one run cannot warm the next. Runs are interleaved
(v4c, transformers fp32, transformers bf16, v4c, ...) and each figure is the median of the runs,
with min and max.

One run: a seeded random prompt of `context` tokens per sequence, prefilled (time to first token:
the prompt's forward plus picking the first token), then `new_tokens` greedy decode steps.

Achieved bandwidth: the bytes a decode step must read over the step time. Weights: every
parameter a step reads (the embedding's rows only; of the routed experts, the ones a batch can
select: min(E, batch x k)). KV: the sliding ring, every indexer key and HCA entry of the context,
and top-k CSA entries. The memory bandwidth it is compared with is a STREAM-like copy (a 256 MiB
tensor, read and written) measured in the same run: before the first round and after every round,
the median of those (the fraction of the fastest copy is reported too).
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .runtime.artifact import open_artifact
from .runtime.errors import V4CError
from .runtime.kv import family_of
from .runtime.dtypes import torch_dtype

EXPERT_KERNELS = ("moe_experts", "moe_experts_q", "moe_experts_q_shared")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                                               / 2**30, 1)}


def copy_bandwidth(nbytes: int = 256 << 20, runs: int = 7) -> float:
    """Bytes read + written per second by a large tensor copy (median of `runs`)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def _nbytes(spec) -> int:
    n = torch_dtype(spec.dtype).itemsize
    for d in spec.shape:
        n *= d if isinstance(d, int) else 1
    return n


def decode_bytes(art, batch: int, context: int) -> dict:
    """Bytes one decode step (batch sequences, one token each, `context` tokens behind them) reads."""
    program, cfg = art.program, art.config
    weights = 0
    seen = set()
    for step in program.steps:
        names = [a[1:] for a in step.inputs if isinstance(a, str) and a.startswith("@")]
        for name in names:
            if name in seen:
                continue
            seen.add(name)
            size = _nbytes(program.params[name])
            if step.kernel in ("embed", "embed_fp8"):
                size = size * batch // program.params[name].shape[0]
            elif step.kernel in EXPERT_KERNELS and program.params[name].shape[0] == cfg.n_routed_experts:
                size = size * min(cfg.n_routed_experts, batch * cfg.num_experts_per_tok) // cfg.n_routed_experts
            weights += size
    kv = 0
    for name, spec in program.states.items():
        per_entry = _nbytes(spec) // max(1, spec.shape[1] if isinstance(spec.shape[1], int) else 1)
        fam, layer = family_of(name, cfg), int(name.split(".")[1])
        rate = cfg.compress_rates[layer]
        rows = {"sliding ring": spec.shape[1], "CSA indexer keys": context // max(rate, 1),
                "HCA entries": context // max(rate, 1),
                "CSA entries": min(cfg.index_topk, context // max(rate, 1))}.get(fam, spec.shape[1])
        kv += batch * rows * per_entry
    return {"weight_bytes": weights, "kv_bytes": kv}


def _rss() -> int:
    """This process's peak resident set. VmHWM belongs to the address space, which exec replaces;
    getrusage's ru_maxrss would carry over the parent's peak across fork + exec."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed_run(forward, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Prefill `prompt` [B, S] through `forward` (-> logits [B, S, V]), then greedy decode."""
    t0 = time.perf_counter()
    token = forward(prompt)[:, -1].argmax(-1, keepdim=True)
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        token = forward(token)[:, -1].argmax(-1, keepdim=True)
    decode = time.perf_counter() - t1
    b, s = prompt.shape
    return {"ttft_s": ttft, "prefill_tokens_per_s": b * s / ttft, "decode_s": decode,
            "decode_tokens_per_s": b * new_tokens / decode, "decode_step_s": decode / new_tokens}


def _prompt(batch: int, context: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(0))


def child_v4c(artifact: str, batch: int, context: int, new_tokens: int, kernels: str) -> dict:
    art = open_artifact(artifact)
    session = art.session(batch, kernels=kernels)
    out = _timed_run(session.forward, _prompt(batch, context, art.config.vocab_size), new_tokens)
    out["kernels"] = session.kernels.report()
    return out


def child_transformers(checkpoint: str, dtype: str, batch: int, context: int, new_tokens: int) -> dict:
    from transformers import DeepseekV4ForCausalLM
    model = DeepseekV4ForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype), attn_implementation="eager")
    model.eval()
    impl = "default"
    try:  # transformers' default grouped_mm experts need 16-byte aligned strides (odd tiny configs lack them)
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long))
    except RuntimeError:
        model.set_experts_implementation("eager")
        impl = "eager"
    cache = {"past": None}

    @torch.no_grad()
    def forward(x):
        out = model(input_ids=x, past_key_values=cache["past"], use_cache=True)
        cache["past"] = out.past_key_values
        return out.logits
    out = _timed_run(forward, _prompt(batch, context, model.config.vocab_size), new_tokens)
    out["experts_implementation"] = impl
    return out


def _child(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, "-m", "v4c.bench", "child", *args], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise V4CError(f"benchmark run {' '.join(args[:2])} failed:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench(artifact: str, *, baseline: str | None, checkpoint: str | None, context: int, new_tokens: int, batch: int,
          runs: int, kernels: str = "auto", progress=print) -> dict:
    art = open_artifact(artifact)
    if context + new_tokens > art.program.max_context:
        raise V4CError(f"context {context} + new tokens {new_tokens} exceeds the artifact's max_context "
                       f"{art.program.max_context} (kv.max_context in model.yaml)")
    common = [str(batch), str(context), str(new_tokens)]
    who = {"v4c": ["v4c", artifact, kernels, *common]}
    if baseline == "transformers":
        if checkpoint is None:
            raise V4CError("--baseline transformers needs --checkpoint: the Hugging Face checkpoint this artifact was "
                           "compiled from")
        who["transformers_fp32"] = ["transformers", checkpoint, "float32", *common]
        who["transformers_bf16"] = ["transformers", checkpoint, "bfloat16", *common]
    copies = [copy_bandwidth()]  # a shared machine's bandwidth drifts: measured again after every round
    results: dict[str, list[dict]] = {k: [] for k in who}
    for r in range(runs):
        for name, args in who.items():
            progress(f"run {r + 1}/{runs}: {name}")
            results[name].append(_child(args))
        copies.append(copy_bandwidth())
    bandwidth = statistics.median(copies)
    moved = decode_bytes(art, batch, context + new_tokens // 2)
    out = {"artifact": str(artifact), "target": art.target, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
           "batch": batch, "context": context, "new_tokens": new_tokens, "runs": runs,
           "memory_bandwidth_bytes_per_s": bandwidth, "memory_bandwidth_samples": copies,
           "decode_bytes_per_step": moved, "systems": {}}
    for name, rows in results.items():
        row = {key: _summary([r[key] for r in rows]) for key in
               ("prefill_tokens_per_s", "ttft_s", "decode_tokens_per_s", "decode_step_s", "peak_rss_bytes")}
        if name == "v4c":
            achieved = (moved["weight_bytes"] + moved["kv_bytes"]) / row["decode_step_s"]["median"]
            row["achieved_bytes_per_s"] = achieved
            row["fraction_of_bandwidth"] = achieved / bandwidth
            row["fraction_of_best_copy"] = achieved / max(copies)
            row["kernels"] = rows[-1]["kernels"]
        else:
            row["experts_implementation"] = rows[-1]["experts_implementation"]
        out["systems"][name] = row
    if baseline == "transformers":
        best = max(out["systems"]["transformers_fp32"]["decode_tokens_per_s"]["median"],
                   out["systems"]["transformers_bf16"]["decode_tokens_per_s"]["median"])
        out["decode_speedup_vs_best_transformers"] = out["systems"]["v4c"]["decode_tokens_per_s"]["median"] / best
        out["peak_rss_vs_transformers_bf16"] = (out["systems"]["v4c"]["peak_rss_bytes"]["median"]
                                                / out["systems"]["transformers_bf16"]["peak_rss_bytes"]["median"])
    return out


def _main_child(argv: list[str]) -> None:
    kind, path, mode, batch, context, new = argv
    torch.manual_seed(0)
    if kind == "v4c":
        out = child_v4c(path, int(batch), int(context), int(new), mode)
    else:
        out = child_transformers(path, mode, int(batch), int(context), int(new))
    out["peak_rss_bytes"] = _rss()
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1:2] != ["child"]:
        sys.exit("usage: python -m v4c.bench child (v4c ARTIFACT KERNELS | transformers CHECKPOINT DTYPE) B CONTEXT NEW")
    _main_child(sys.argv[2:])

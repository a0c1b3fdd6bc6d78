"""The GPU benches' measuring tools (bench/triton_gpu.py and its siblings): a timer of device time (CUDA-graph replays
of rotated input copies, or events), the machine's description, the fastest of several launch configs, errors and
logit agreement, and the device-to-device copy bandwidth the kernels are compared with."""

import platform
import statistics
import sys
import time

import torch


class Timer:
    """Median / min / max seconds of `fn` over `repeats` runs after `warmup` (CUDA events on a GPU).

    `timer(fn)` times single eager calls: on a GPU that includes the host's launch overhead whenever the
    kernel is shorter than it. `timer.graph(fns)` captures the calls `fns` (one per input copy, so that
    rotating copies keep the inputs out of L2) in one CUDA graph and times its replays: device time per
    call, without the host. Off a GPU both time the calls on the host clock."""

    def __init__(self, device: str, repeats: int, warmup: int):
        self.device, self.repeats, self.warmup = device, repeats, warmup

    def __call__(self, fn) -> dict:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}

    def graph(self, fns: list) -> dict:
        def run_all():
            for fn in fns:
                fn()
        if self.device != "cuda":
            t = self(run_all)
            return {k: v / len(fns) for k, v in t.items()} | {"calls_per_replay": len(fns), "method": "host clock"}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compiles, allocator pools) off the capturing stream
            run_all()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run_all()
        t = self(graph.replay)
        return {k: v / len(fns) for k, v in t.items()} | {"calls_per_replay": len(fns), "method": "CUDA graph replay"}


def machine(device: str) -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sm=f"{p.major}.{p.minor}",
                   cuda=torch.version.cuda)
    return out


def fastest(time_config, configs: list[dict], label: str, tried: list | None = None) -> tuple[dict, dict]:
    """(times, config) of the fastest config by `time_config(config)`; a config the GPU cannot run (too
    much shared memory, say) is skipped and said so. `tried` collects {"config", "median_s" or "error"}."""
    best = None
    for cfg in configs:
        try:
            t = time_config(cfg)
        except Exception as exc:
            print(f"  {label} config {cfg}: {type(exc).__name__}: {exc}", file=sys.stderr)
            if tried is not None:
                tried.append({"config": cfg, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        if tried is not None:
            tried.append({"config": cfg, "median_s": t["median_s"]})
        if best is None or t["median_s"] < best[0]["median_s"]:
            best = (t, cfg)
    if best is None:
        raise RuntimeError(f"{label}: no launch config ran")
    return best


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|, on the CPU (references are often computed there)."""
    ours, ref = ours.float().cpu(), ref.float().cpu()
    return float((ours - ref).abs().max() / ref.abs().max())


def logits_agreement(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    """Logits [..., V] against reference logits: rel_err and the fraction of equal argmaxes."""
    ours, ref = ours.float().cpu(), ref.float().cpu()
    agree = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
    return {"rel_err": rel_err(ours, ref), "argmax_agreement": agree}


def copies_for(nbytes: int, device: str) -> int:
    """Input copies to rotate so that one graph replay reads >= 256 MB (L2 is 50 MB on an H100)."""
    return 1 if device != "cuda" else max(1, min(32, -(-2**28 // max(nbytes, 1))))


def copy_bandwidth(device: str, timer: Timer, nbytes: int) -> dict:
    """Device-to-device copy: bytes read + written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    return {**t, "bytes": nbytes, "gb_per_s": round(2 * nbytes / t["median_s"] / 1e9, 1)}

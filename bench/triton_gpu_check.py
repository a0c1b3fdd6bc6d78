"""Step-by-step check of a triton artifact on a GPU: every Triton launch is compared with the runtime's
torch kernel run on copies of the same inputs (state included), on the same device.

    python3 bench/triton_gpu_check.py [--config small|medium] [--prompt 64] [--new 4]

Prints, per kernel, the largest error over its calls (max |triton - torch| / max |torch|; integer outputs:
the fraction of entries that differ) and the first steps above --tol (each also run by the torch kernel on
the CPU, to tell which side is off: a torch kernel on a GPU rounds some e4m3 ties the other way), and the
largest fraction of bytes
that differ in its encoded (uint8) state: FP8 / FP4 entries, where a last-bit difference of an fp32
block scale (from summation order) changes one byte; then the prefill logits of three
runs of the whole artifact: torch kernels on the CPU, torch kernels on --device, triton on --device.
Needs a CUDA GPU. Results go to stdout and, with --out, to a JSON file.

Without a GPU, `--device cpu --as-gpu` (under TRITON_INTERPRET=1) runs the same check with every launcher
deciding as on an H100 (hardware casts, bf16 attention dots, fp8 dots, 132 SMs) and the interpreter computing
those branches as a GPU does (tests/gpu_semantics.py): what the GPU run should show, up to the order of fp32
sums and Hopper's fp8 accumulator.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves, tree_map

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from triton_gpu import MEDIUM, SMALL, _build, logits_agreement, rel_err  # noqa: E402


def _clone(x):
    return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, x)


def _tensors(x) -> list:
    return [v for v in tree_leaves(x) if isinstance(v, torch.Tensor)]


def _error(ours, ref) -> float:
    if ours.shape != ref.shape:
        return float("inf")
    if not ref.is_floating_point():
        return float((ours.cpu() != ref.cpu()).float().mean()) if ref.numel() else 0.0
    ours, ref = ours.float().cpu(), ref.float().cpu()  # (e4m3 codes: rms_norm_quant under the fuse pass)
    return rel_err(ours, ref) if ref.abs().max() > 0 else float((ours.float() - ref.float()).abs().max())


def _errors(ours, ours_kw, ref, ref_kw) -> tuple[list[float], list[float]]:
    """-> (the outputs' and decoded states' errors, the encoded (uint8) states' fractions of differing bytes)."""
    errs = [_error(o, r) for o, r in zip(_tensors(ours), _tensors(ref))]
    pairs = list(zip(_tensors(ours_kw.get("state", ())), _tensors(ref_kw.get("state", ()))))
    errs += [_error(o, r) for o, r in pairs if o.dtype != torch.uint8]
    return errs, [_error(o, r) for o, r in pairs if o.dtype == torch.uint8]


def _cpu(x):
    return tree_map(lambda v: v.cpu().clone() if isinstance(v, torch.Tensor) else v, x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small", choices=["small", "medium", "hc4_mixed"],
                    help="hc4_mixed: a tiny test config, for a dry run with --device cpu (TRITON_INTERPRET=1)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=4)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--dump", type=Path, help="for each kernel over --tol: save its worst launch's inputs and "
                    "both results to DUMP/KERNEL.pt (to study on another machine)")
    ap.add_argument("--tune", action="store_true", help="tune the artifact's launch configs on the GPU at compile "
                    "time (every candidate compiles: minutes; default: the heuristic configs)")
    ap.add_argument("--as-gpu", action="store_true",
                    help="with --device cpu under TRITON_INTERPRET=1: the launchers' GPU branches, computed as a GPU")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --device cpu under TRITON_INTERPRET=1)")
    if args.as_gpu and (dev != "cpu" or os.environ.get("TRITON_INTERPRET") != "1"):
        sys.exit("--as-gpu emulates a GPU in the interpreter: it needs --device cpu and TRITON_INTERPRET=1")
    with _gpu_emulation() if args.as_gpu else contextlib.nullcontext():
        return _check(args, dev)


@contextlib.contextmanager
def _gpu_emulation():
    """Every kernel module's GPU decisions (patched again whenever an artifact loads its own copy) and the
    interpreter's GPU arithmetic."""
    import pytest
    from gpu_semantics import as_gpu, gpu_arithmetic

    from v4c.runtime import kernelset
    original, patched, mp = kernelset._Launch._run, set(), pytest.MonkeyPatch()

    def launch(self, a, kw, config, **into):  # every launch, bound to its buffers (into) or not
        if len(sys.modules) not in patched:
            as_gpu(mp, sms=132)
            patched.add(len(sys.modules))
        return original(self, a, kw, config, **into)
    kernelset._Launch._run = launch
    try:
        with gpu_arithmetic():
            yield
    finally:
        kernelset._Launch._run = original
        mp.undo()


def _check(args, dev: str) -> dict:
    from v4c.runtime import kernelset
    from v4c.runtime.artifact import open_artifact
    from v4c.runtime.kernels import KERNELS

    worst: dict[str, dict] = {}

    def checked(self, a, kw, config, **into):  # every launch, bound to its buffers (into) or not
        ref_a, ref_kw = _clone(a), _clone(kw)  # before the launcher updates any state in place
        kept = (_clone(a), _clone(kw)) if args.dump or dev != "cpu" else None
        ref = KERNELS[self.kernel](*ref_a, **ref_kw)
        ours = original(self, a, kw, config, **into)
        errs, stored = _errors(ours, kw, ref, ref_kw)
        err = max(errs + [0.0])
        w = worst.setdefault(self.kernel, {"calls": 0, "max_err": 0.0, "state_bytes_differ": 0.0, "over_tol": []})
        w["calls"] += 1
        w["max_err"] = max(w["max_err"], err)
        w["state_bytes_differ"] = max([w["state_bytes_differ"]] + stored)
        if err > args.tol and len(w["over_tol"]) < 5:
            row = {"step": self.index, "err": err, "outputs": errs}
            if dev != "cpu":  # which side is off: both against the torch kernel on the CPU, on the same inputs
                cpu_a, cpu_kw = _cpu(kept)
                ref_cpu = KERNELS[self.kernel](*cpu_a, **cpu_kw)
                row["triton_vs_cpu_torch"] = max(_errors(ours, kw, ref_cpu, cpu_kw)[0] + [0.0])
                row["device_torch_vs_cpu_torch"] = max(_errors(ref, ref_kw, ref_cpu, cpu_kw)[0] + [0.0])
            w["over_tol"].append(row)
        if args.dump and err > args.tol and err >= max(e["err"] for e in w["over_tol"]):
            args.dump.mkdir(parents=True, exist_ok=True)  # the worst launch so far: inputs and both results
            torch.save(_cpu({"kernel": self.kernel, "step": self.index, "config": config, "err": err,
                             "args": kept[0], "kwargs": kept[1], "triton": ours, "torch": ref}),
                       args.dump / f"{self.kernel}.pt")
        return ours

    original = kernelset._Launch._run
    kwargs = {"small": SMALL, "medium": MEDIUM}.get(args.config, args.config)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path, model = _build(Path(tmp), args.config, kwargs, args.prompt, args.new, tune=args.tune)
        print(f"compiled {args.config} in {time.perf_counter() - t0:.0f} s", flush=True)
        art = open_artifact(path)
        ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(2))
        logits = {}
        with torch.no_grad():
            logits["torch_cpu"] = art.session(1, kernels="torch", device="cpu").forward(ids).float()
            logits["torch_device"] = art.session(1, kernels="torch", device=dev).forward(ids.to(dev)).float().cpu()
            logits["triton_device"] = art.session(1, device=dev, strict=True).forward(ids.to(dev)).float().cpu()
            kernelset._Launch._run = checked
            try:
                session = art.session(1, device=dev, strict=True)
                out = session.forward(ids.to(dev))
                for _ in range(args.new):
                    out = session.forward(out[:, -1:].argmax(-1))
            finally:
                kernelset._Launch._run = original
    result = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "config": args.config,
              "prompt": args.prompt, "new": args.new, "tol": args.tol, "device": dev, "as_gpu": args.as_gpu,
              "kernels": worst, "logits": {}}
    for a, b in (("torch_device", "torch_cpu"), ("triton_device", "torch_cpu"), ("triton_device", "torch_device")):
        result["logits"][f"{a}_vs_{b}"] = logits_agreement(logits[a], logits[b])
    for name, w in sorted(worst.items(), key=lambda kv: -kv[1]["max_err"]):
        print(f"{name:22} {w['calls']:5} calls  max err {w['max_err']:.2e}  state bytes differing "
              f"{w['state_bytes_differ']:.1%}  first over tol: {w['over_tol'][:2]}")
    for k, v in result["logits"].items():
        print(f"logits {k}: {v}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()

"""Run the reference interpreter over calibration data and record, in `module.stats["calibration"]`:

- for every activation entering a weight (keyed by the weight's name; the routed experts'
  intermediate activations under `<down_proj>`): exact min / max / amax over all tokens, and a
  deterministic sample of rows, from which come percentiles, a histogram, and the static scales
  (amax / 448, and the MSE-optimal clipped scale for e4m3);
- routing counts per MoE layer and expert (experts with fewer than `min_expert_tokens` flagged);
- per-layer output statistics of the residual streams (rms, amax) after attention and after MoE.

The sampled rows themselves stay in `module.stats["calibration_rows"]` (for the report's SQNR).
"""

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from v4c.calibration import file_digest, split, token_stream, windows
from v4c.ir import Module
from v4c.runtime.kernels.basic import swiglu
from v4c.runtime.quant import E4M3_MAX, fake_quant_static

ROWS = 256  # sampled rows kept per activation
CLIPS = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]  # MSE search over clipped amax
HIST_BINS = 64


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: Path
    tokenizer: Path | None = None
    samples: int = 32
    seq_len: int = 256
    seed: int = 0
    batch: int = 4
    min_expert_tokens: int = 16
    holdout: bool = True  # keep the stream's last 10% out (it is the report's held-out text)


class _Acc:
    """Running statistics of one activation: exact extremes, sampled rows."""

    def __init__(self, per_call: int, seed: int):
        self.min, self.max, self.amax, self.count, self.rows = float("inf"), float("-inf"), 0.0, 0, []
        self.per_call, self.gen = per_call, torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor):
        x = x.detach().float().reshape(-1, x.shape[-1])
        if not x.numel():
            return
        self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))
        self.amax, self.count = max(self.amax, float(x.abs().max())), self.count + x.shape[0]
        keep = torch.randperm(x.shape[0], generator=self.gen)[: self.per_call]
        self.rows.append(x[keep].clone())

    def summary(self) -> tuple[dict, torch.Tensor]:
        rows = torch.cat(self.rows)[:ROWS]
        flat = rows.flatten()
        mags = flat.abs()
        pct = {f"p{q}": float(torch.quantile(mags[:1_000_000], q / 100)) for q in (99, 99.9, 99.99)}
        mse = {}
        for c in CLIPS:
            s = max(self.amax * c, 1e-8) / E4M3_MAX
            mse[s] = float((fake_quant_static(rows, s) - rows).pow(2).mean())
        best = min(mse, key=mse.get)
        lo, hi = (self.min, self.max) if self.max > self.min else (self.min - 1, self.max + 1)
        hist = torch.histc(flat, bins=HIST_BINS, min=lo, max=hi)
        return ({"tokens": self.count, "min": self.min, "max": self.max, "amax": self.amax,
                 "mean_abs": float(mags.mean()), **pct, "amax_scale": max(self.amax, 1e-8) / E4M3_MAX,
                 "mse_scale": best, "hist": {"min": lo, "max": hi, "counts": [int(c) for c in hist]}}, rows)


def _layer(name: str) -> int:
    return int(name.split(".")[1])


def run(m: Module, options: Options, progress=None) -> Module:
    from v4c.interpret import interpret  # the interpreter lowers with the torch target
    cfg = m.config
    stream = token_stream(options.data, options.tokenizer, cfg["vocab_size"])
    calib = split(stream)[0] if options.holdout else stream
    data = windows(calib, options.samples, options.seq_len, options.seed, "calibration", options.data)
    calls = -(-options.samples // options.batch)
    per_call = -(-ROWS // calls)
    acts: dict[str, _Acc] = {}
    routing: dict[int, torch.Tensor] = {}
    blocks: dict[int, str] = {}  # hc_post step index -> "L.attention" / "L.moe" (program order)
    outputs_seen: dict[str, list] = {}

    def acc(name: str) -> _Acc:
        return acts.setdefault(name, _Acc(per_call, options.seed + len(acts)))

    def observe(i, step, inputs, outputs):
        k = step.kernel
        if k in ("linear", "grouped_linear") and isinstance(step.inputs[1], str):
            acc(step.inputs[1][1:]).add(inputs[0])
        elif k == "moe_experts":
            x, _, idx, gate_up, _ = inputs
            acc(step.inputs[3][1:]).add(x)
            flat, ids = x.reshape(-1, x.shape[-1]), idx.reshape(-1, idx.shape[-1])
            mid = []
            for e in torch.unique(ids).tolist():  # the experts' intermediate activations
                tokens = torch.where(ids == e)[0]
                gate, up = torch.nn.functional.linear(flat[tokens], gate_up[e].float()).chunk(2, dim=-1)
                mid.append(swiglu(gate, up, limit=step.attrs.get("limit")))
            acc(step.inputs[4][1:]).add(torch.cat(mid))
        elif k in ("route_topk", "route_hash"):
            layer = _layer(step.inputs[1][1:])
            counts = torch.bincount(outputs[1].flatten(), minlength=cfg["n_routed_experts"])
            routing[layer] = routing.get(layer, 0) + counts
        elif k == "hc_post":
            if i not in blocks:
                n = len(blocks)
                blocks[i] = f"{n // 2}.{'attention' if n % 2 == 0 else 'moe'}"
            out = outputs[0]
            outputs_seen.setdefault(blocks[i], []).append((float(out.pow(2).mean().sqrt()), float(out.abs().max())))

    sessions = {}  # batch size -> session (weights materialised once per size)
    for c in range(calls):
        batch = data[c * options.batch:(c + 1) * options.batch]
        session = sessions.get(batch.shape[0])
        if session is None:
            session = sessions[batch.shape[0]] = interpret(m, batch=batch.shape[0], prefill_chunk=options.seq_len)
        session.reset()
        session.forward(batch, observer=observe)
        if progress:
            progress("calibrating", min((c + 1) * options.batch, options.samples), options.samples)

    stats, rows = {}, {}
    for name, a in sorted(acts.items()):
        stats[name], rows[name] = a.summary()
    layers = {name: {"rms": sum(r for r, _ in seen) / len(seen), "amax": max(a for _, a in seen)}
              for name, seen in outputs_seen.items()}
    experts = {str(layer): {"counts": counts.tolist(),
                            "flagged": [e for e, n in enumerate(counts.tolist()) if n < options.min_expert_tokens]}
               for layer, counts in sorted(routing.items())}
    out = m.replace()
    out.stats["calibration"] = {
        "data": Path(options.data).name, "data_sha256": file_digest(options.data), "samples": options.samples,
        "seq_len": options.seq_len, "seed": options.seed, "tokens": int(data.numel()),
        "min_expert_tokens": options.min_expert_tokens,
        "activations": stats, "experts": experts, "layers": layers}
    out.stats["calibration_rows"] = rows
    out.counters["calibrate"] = {"activations_observed": len(stats), "tokens": int(data.numel()),
                                 "flagged_experts": sum(len(e["flagged"]) for e in experts.values())}
    return out

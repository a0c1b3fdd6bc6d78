"""The calibration / drift report: the compiled module against the unquantized reference.

    end_to_end   on held-out windows: KL(reference || compiled) per token (mean, p99), top-1
                 agreement, top-5 containment (reference top-1 in the compiled top-5), perplexity of
                 both; `by_position` the same KL and top-1 by position bucket (long-context sweep)
    weights      SQNR (dB) of every quantized weight; `layers` the worst per layer
    activations  SQNR of every quantized activation on the calibration rows, and its statistics
    kv           SQNR of the compressed KV entries in their storage format
    experts      routing counts per layer and expert, with the flagged ones
    bytes        weight bytes by dtype, before and after
"""

import math
import re

import torch

from v4c import __version__
from v4c.calibration import file_digest, split, token_stream, windows
from v4c.interpret import interpret
from v4c.ir import Module, ParamRef, load_weight
from v4c.runtime.dtypes import torch_dtype
from v4c.runtime.kernels import ATTENTION
from v4c.runtime.quant import decode_entries, dequant_fp4, dequant_fp8, encode_entries, fake_quant_act

MAX_DB = 200.0  # an exact copy; keeps the JSON finite
BUCKETS = 16


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    signal, noise = float(ref.float().pow(2).sum()), float((ref.float() - approx.float()).pow(2).sum())
    return MAX_DB if noise == 0 else min(MAX_DB, 10 * math.log10(max(signal, 1e-30) / noise))


def _layer(name: str) -> str:
    m = re.match(r"layers\.(\d+)\.", name)
    return m.group(1) if m else name.split(".")[0]


def _bytes(m: Module) -> dict[str, int]:
    out = {}
    for t in m.params.values():
        n = torch_dtype(t.dtype).itemsize
        for d in t.shape:
            n *= d
        out[t.dtype] = out.get(t.dtype, 0) + n
    return out


def _dequantized(final: Module, name: str, info: dict) -> torch.Tensor:
    w = load_weight(final.weights[name])
    if final.stats["fp8"].get("fake_quant"):
        return w.float()
    s = load_weight(final.weights[info["scale"]])
    deq = (lambda q, sc: dequant_fp4(q, sc)) if info["format"] == "fp4" else \
        (lambda q, sc: dequant_fp8(q, sc, info["block"]))
    return torch.stack([deq(q, sc) for q, sc in zip(w, s)]) if w.dim() == 3 else deq(w, s)


def _activation_modes(final: Module) -> dict[str, dict]:
    """weight name -> the activation quantization its op applies."""
    made_by = {r.name: ins for ins in final.func.body for r in ins.results}
    modes = {}
    for ins in final.func.body:
        ws = [o.name for o in ins.operands if isinstance(o, ParamRef)]
        if ins.op in ("linear_fp8", "grouped_linear_fp8", "swiglu_linear_fp8"):
            modes[ws[0]] = ins.attrs["act"]
        elif ins.op in ("linear", "grouped_linear") and not isinstance(ins.operands[0], ParamRef):
            src = made_by.get(ins.operands[0].name)
            if src is not None and src.op == "fake_quant":
                modes[ws[0]] = src.attrs["act"]
        elif ins.op in ("moe_experts_q", "moe_experts") and "act_in" in ins.attrs:
            gu, down = [o.name for o in ins.operands if isinstance(o, ParamRef) and not o.name.endswith(".scale")]
            modes[gu], modes[down] = ins.attrs["act_in"], ins.attrs["act_mid"]
    return modes


def heldout_windows(spec, tokenizer, vocab: int, max_context: int) -> tuple[torch.Tensor, dict]:
    c = spec.calibration
    seq = min(c.heldout_seq_len or 4 * c.seq_len, max_context)
    if c.heldout is not None:
        stream, source, path = token_stream(c.heldout, tokenizer, vocab), c.heldout.name, c.heldout
    else:
        stream, source, path = split(token_stream(c.data, tokenizer, vocab))[1], f"{c.data.name} (last 10%)", c.data
    data = windows(stream, c.heldout_samples, seq, c.seed + 1, "held-out text", path)
    return data, {"source": source, "sha256": file_digest(path), "windows": c.heldout_samples, "seq_len": seq,
                  "tokens": int(data.numel())}


def end_to_end(reference: Module, final: Module, data: torch.Tensor, progress=None) -> tuple[dict, dict]:
    ref_s, fin_s = interpret(reference), interpret(final)
    kl, top1, top5, nll_r, nll_q = [], [], [], [], []
    for i, window in enumerate(data):
        ref_s.reset()
        fin_s.reset()
        lr = torch.log_softmax(ref_s.forward(window[None])[0].double(), -1)
        lq = torch.log_softmax(fin_s.forward(window[None])[0].double(), -1)
        kl.append((lr.exp() * (lr - lq)).sum(-1))
        best = lr.argmax(-1)
        top1.append((lq.argmax(-1) == best).double())
        top5.append((lq.topk(5, -1).indices == best[:, None]).any(-1).double())
        target = window[1:, None]
        nll_r.append(-lr[:-1].gather(-1, target).squeeze(-1))
        nll_q.append(-lq[:-1].gather(-1, target).squeeze(-1))
        if progress:
            progress("held-out report", i + 1, len(data))
    kl, top1 = torch.stack(kl), torch.stack(top1)  # [windows, seq]
    ppl_r, ppl_q = math.exp(float(torch.cat(nll_r).mean())), math.exp(float(torch.cat(nll_q).mean()))
    summary = {"kl_mean": float(kl.mean()), "kl_p99": float(torch.quantile(kl.flatten().float(), 0.99)),
               "top1": float(top1.mean()), "top5": float(torch.cat(top5).mean()),
               "ppl_reference": ppl_r, "ppl_compiled": ppl_q, "ppl_increase": ppl_q / ppl_r - 1}
    edges = torch.linspace(0, kl.shape[1], BUCKETS + 1).long().tolist()
    by_pos = {"bucket_start": edges[:-1], "kl_mean": [float(kl[:, a:b].mean()) for a, b in zip(edges, edges[1:])],
              "top1": [float(top1[:, a:b].mean()) for a, b in zip(edges, edges[1:])]}
    return summary, by_pos


def kv_error(reference: Module, final: Module, window: torch.Tensor) -> dict:
    """SQNR of the compressed KV entries (those `attention` reads) stored in the compiled format."""
    writer = {ins.state[-1]: ins for ins in final.func.body if ins.op == "compress"}  # entries -> its compress
    kv_states = [ins.state[1] for ins in final.func.body if ins.op in ATTENTION and len(ins.state) > 1]
    session = interpret(reference)
    session.forward(window[None])
    out = {}
    for name in kv_states:
        ins = writer[name]
        kv_format, rope = ins.attrs.get("kv_format", "f32"), 2 * final.params[ins.operands[4].name].shape[0]
        n = session.pos // ins.attrs["rate"]
        entries = session.state[name][:, :n]
        stored = encode_entries(entries, kv_format, rope)
        back = decode_entries(stored, kv_format, entries.shape[-1], rope)
        per_entry = stored.shape[-1] * stored.element_size()
        out[name] = {"layer": _layer(name), "format": kv_format, "sqnr_db": sqnr_db(entries, back) if n else None,
                     "bytes_per_entry": per_entry, "bytes_per_entry_f32": entries.shape[-1] * 4}
    return out


def build_report(reference: Module, final: Module, spec, tokenizer, progress=None) -> dict:
    cal = final.stats.get("calibration", {})
    rows = final.stats.get("calibration_rows", {})
    quantized = final.stats.get("fp8", {}).get("weights", {})
    data, heldout = heldout_windows(spec, tokenizer, final.config["vocab_size"], final.max_context)
    e2e, by_pos = end_to_end(reference, final, data, progress)
    weights = {}
    for name, info in sorted(quantized.items()):
        weights[name] = {"layer": _layer(name), "format": info["format"], "block": info["block"],
                         "sqnr_db": sqnr_db(load_weight(reference.weights[name]), _dequantized(final, name, info))}
    acts = {}
    for name, mode in sorted(_activation_modes(final).items()):
        if name in rows and mode["mode"] != "none":
            x = rows[name]
            acts[name] = {"layer": _layer(name), "mode": mode["mode"], "sqnr_db": sqnr_db(x, fake_quant_act(x, mode))}
    layers = {}
    for kind, table in (("weight_sqnr_db", weights), ("activation_sqnr_db", acts)):
        for row in table.values():
            worst = layers.setdefault(row["layer"], {}).get(kind)
            layers[row["layer"]][kind] = row["sqnr_db"] if worst is None else min(worst, row["sqnr_db"])
    recipe = {k: v for k, v in final.stats.get("fp8", {}).items() if k != "weights"}
    return {
        "v4c_version": __version__, "model": final.name,
        "calibration": {k: cal.get(k) for k in ("data", "data_sha256", "samples", "seq_len", "seed", "tokens",
                                                 "min_expert_tokens")},
        "heldout": heldout, "recipe": recipe or None,
        "end_to_end": e2e, "by_position": by_pos,
        "layers": dict(sorted(layers.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0, kv[0]))),
        "weights": weights,
        "activations": {name: {**cal.get("activations", {}).get(name, {}), **acts.get(name, {})}
                        for name in cal.get("activations", {})},
        "kv": kv_error(reference, final, data[0]) if recipe else {},
        "experts": cal.get("experts", {}),
        "bytes": {"before": _bytes(reference), "after": _bytes(final)},
    }

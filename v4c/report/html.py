"""`report/index.html`: one self-contained page (inline CSS and SVG) to look at a report."""

from html import escape

from . import svg
from .gates import headline

CSS = """body{font-family:sans-serif;margin:24px;color:#1a202c;max-width:1320px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px;border-bottom:1px solid #e2e8f0}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #e2e8f0;border-radius:6px;padding:8px 14px}
.card b{display:block;font-size:18px}.ok{color:#276749}.bad{color:#c53030;font-weight:bold}
table{border-collapse:collapse}td,th{border:1px solid #e2e8f0;padding:3px 8px;text-align:right}
th{background:#f7fafc}td:first-child{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:8px}
.muted{color:#718096}"""


def _db(v) -> str:
    return "n/a" if v is None else f"{v:.2f} dB"


def _recipe(recipe: dict | None) -> str:
    if not recipe:
        return "none (unquantized)"
    a = recipe["activations"]
    acts = a["mode"] if a["mode"] != "dynamic" else f"dynamic, groups of {a['group']}"
    return (f"experts {recipe['experts']}, activations {acts}, KV {recipe['kv']}, {len(recipe['skipped'])} candidate weights "
            f"kept by skip patterns{', fake-quant' if recipe['fake_quant'] else ''}")


def _card(label: str, value: str, cls: str = "") -> str:
    return f'<div class="card">{escape(label)}<b class="{cls}">{escape(value)}</b></div>'


def _gates(rows: list[dict]) -> str:
    if not rows:
        return '<p class="muted">No drift gates configured (report.thresholds in model.yaml).</p>'
    body = []
    for r in rows:
        value = "n/a" if r["value"] is None else f"{r['value']:.5g}"
        result, cls = ("passed", "ok") if r["passed"] else ("FAILED", "bad")
        body.append(f"<tr><td>{escape(r['gate'])}</td><td>{value}</td><td>{r['limit']:.5g}</td>"
                    f'<td class="{cls}">{result} {escape(r["where"])}</td></tr>')
    return f"<table><tr><th>gate</th><th>value</th><th>limit</th><th>result</th></tr>{''.join(body)}</table>"


def render(report: dict, gate_rows: list[dict], thresholds: dict) -> str:
    h, e = headline(report), report["end_to_end"]
    before, after = sum(report["bytes"]["before"].values()), sum(report["bytes"]["after"].values())
    cards = [_card("KL mean / p99", f"{e['kl_mean']:.4g} / {e['kl_p99']:.4g}"),
             _card("top-1 agreement", f"{e['top1'] * 100:.2f}%"), _card("top-5 containment", f"{e['top5'] * 100:.2f}%"),
             _card("perplexity (reference → compiled)", f"{e['ppl_reference']:.4g} → {e['ppl_compiled']:.4g} "
                                                        f"({e['ppl_increase'] * 100:+.2f}%)"),
             _card("weight bytes (before → after)", f"{before / 2**20:.2f} → {after / 2**20:.2f} MiB "
                                                     f"({after / before:.3f}x)")]
    failed = [r for r in gate_rows if not r["passed"]]
    if gate_rows:
        cards.append(_card("drift gates", "FAILED" if failed else "passed", "bad" if failed else "ok"))
    layers = report["layers"]
    labels = list(layers)
    sections = [
        f"<h1>v4c calibration report: {escape(report['model'])}</h1>",
        f'<p class="muted">v4c {escape(report["v4c_version"])}; calibration on {escape(str(report["calibration"]["data"]))} '
        f'({report["calibration"]["tokens"]} tokens); held-out {escape(report["heldout"]["source"])} '
        f'({report["heldout"]["windows"]} windows of {report["heldout"]["seq_len"]} tokens); recipe: '
        f'{escape(_recipe(report.get("recipe")))}</p>',
        f'<div class="cards">{"".join(cards)}</div>',
        "<h2>Drift gates</h2>", _gates(gate_rows),
        "<h2>Quantization error by layer</h2>",
        svg.bar_chart("SQNR by layer (worst tensor of each kind)", labels,
                      {"weights": [layers[k].get("weight_sqnr_db") for k in labels],
                       "activations": [layers[k].get("activation_sqnr_db") for k in labels]},
                      "dB", thresholds.get("min_sqnr_db")) if labels else
        '<p class="muted">Nothing is quantized in this build (no fp8 pass).</p>',
        "<h2>Against the unquantized reference, by position (long-context sweep)</h2>",
        svg.line_chart("KL(reference || compiled), mean per position bucket", report["by_position"]["bucket_start"],
                       {"KL": report["by_position"]["kl_mean"]}, "nats", "token position"),
        svg.line_chart("top-1 agreement per position bucket", report["by_position"]["bucket_start"],
                       {"top-1": report["by_position"]["top1"]}, "share", "token position", from_zero=False),
    ]
    if report["kv"]:
        kv = list(report["kv"].values())
        sections += ["<h2>KV cache quantization</h2>",
                     svg.bar_chart(f"KV entry SQNR by layer ({kv[0]['format']}, {kv[0]['bytes_per_entry']} bytes "
                                   f"per entry vs {kv[0]['bytes_per_entry_f32']} in f32)", [r["layer"] for r in kv],
                                   {"entries": [r["sqnr_db"] for r in kv]}, "dB")]
    if report["experts"]:
        ex = report["experts"]
        sections += ["<h2>Expert routing coverage on the calibration data</h2>",
                     svg.heatmap("tokens routed per expert", [f"layer {k}" for k in ex], len(next(iter(ex.values()))["counts"]),
                                 [v["counts"] for v in ex.values()], [v["flagged"] for v in ex.values()])]
    worst = sorted(report["weights"].items(), key=lambda kv: kv[1]["sqnr_db"])[:12]
    if worst:
        rows = "".join(f"<tr><td>{escape(n)}</td><td>{r['format']}</td><td>{r['block'][0]}x{r['block'][1]}</td>"
                       f"<td>{r['sqnr_db']:.2f}</td><td>{report['activations'].get(n, {}).get('sqnr_db', float('nan')):.2f}"
                       f"</td></tr>" for n, r in worst)
        sections += ["<h2>Weights with the lowest SQNR</h2>",
                     "<table><tr><th>weight</th><th>format</th><th>block</th><th>weight SQNR (dB)</th>"
                     f"<th>activation SQNR (dB)</th></tr>{rows}</table>"]
    acts = [(n, a) for n, a in report["activations"].items() if a.get("hist")]
    acts.sort(key=lambda kv: -kv[1]["amax"] / max(kv[1].get("p99.9", 0) or 1e-9, 1e-9))
    if acts:
        sections += ["<h2>Activation histograms (most outlier-heavy: amax / p99.9)</h2>",
                     '<div class="grid">' + "".join(
                         svg.histogram(f"{n.split('.weight')[0][-40:]} (amax {a['amax']:.3g})", a["hist"]["min"],
                                       a["hist"]["max"], a["hist"]["counts"]) for n, a in acts[:6]) + "</div>"]
    dtypes = sorted(set(report["bytes"]["before"]) | set(report["bytes"]["after"]))
    rows = "".join(f"<tr><td>{d}</td><td>{report['bytes']['before'].get(d, 0):,}</td>"
                   f"<td>{report['bytes']['after'].get(d, 0):,}</td></tr>" for d in dtypes)
    sections += ["<h2>Weight bytes by dtype</h2>",
                 f"<table><tr><th>dtype</th><th>before</th><th>after</th></tr>{rows}"
                 f"<tr><th>total</th><th>{before:,}</th><th>{after:,}</th></tr></table>",
                 f'<p class="muted">worst weight SQNR {_db(h["min_weight_sqnr_db"])}, worst activation SQNR '
                 f'{_db(h["min_activation_sqnr_db"])}. The numbers behind this page: calibration.json.</p>']
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>v4c report: {escape(report["model"])}</title>'
            f"<style>{CSS}</style></head><body>{''.join(sections)}</body></html>\n")

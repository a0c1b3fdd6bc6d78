"""Drift gates: thresholds on a report, and the comparison of two reports (`v4c report diff`)."""

import json
from pathlib import Path

from v4c.runtime.errors import V4CError

REPORT = "report/calibration.json"
HEADLINE = [  # (key, label, better direction)
    ("kl_mean", "KL mean", "lower"), ("kl_p99", "KL p99", "lower"), ("top1", "top-1 agreement", "higher"),
    ("top5", "top-5 containment", "higher"), ("ppl_reference", "perplexity, reference", "lower"),
    ("ppl_compiled", "perplexity, compiled", "lower"), ("ppl_increase", "perplexity increase", "lower"),
    ("min_weight_sqnr_db", "worst weight SQNR (dB)", "higher"),
    ("min_activation_sqnr_db", "worst activation SQNR (dB)", "higher"),
    ("weight_bytes", "weight bytes", "lower"),
]


class DriftError(V4CError):
    exit_code = 1


def headline(report: dict) -> dict:
    """The numbers gates and diffs look at."""
    e = report["end_to_end"]
    w = [r["weight_sqnr_db"] for r in report["layers"].values() if "weight_sqnr_db" in r]
    a = [r["activation_sqnr_db"] for r in report["layers"].values() if "activation_sqnr_db" in r]
    return {**{k: e[k] for k in ("kl_mean", "kl_p99", "top1", "top5", "ppl_reference", "ppl_compiled", "ppl_increase")},
            "min_weight_sqnr_db": min(w) if w else None, "min_activation_sqnr_db": min(a) if a else None,
            "weight_bytes": sum(report["bytes"]["after"].values())}


def check(report: dict, thresholds: dict) -> list[dict]:
    """-> one row per configured gate: name, value, limit, passed."""
    h, rows = headline(report), []

    def gate(name, value, limit, passed, where=""):
        rows.append({"gate": name, "value": value, "limit": limit, "passed": bool(passed), "where": where})

    if thresholds.get("max_kl") is not None:
        gate("max_kl", h["kl_mean"], thresholds["max_kl"], h["kl_mean"] <= thresholds["max_kl"])
    if thresholds.get("min_top1") is not None:
        gate("min_top1", h["top1"], thresholds["min_top1"], h["top1"] >= thresholds["min_top1"])
    if thresholds.get("max_ppl_increase") is not None:
        gate("max_ppl_increase", h["ppl_increase"], thresholds["max_ppl_increase"],
             h["ppl_increase"] <= thresholds["max_ppl_increase"])
    if thresholds.get("min_sqnr_db") is not None:
        worst = min(((row[k], f"layer {layer} {k.split('_')[0]}s") for layer, row in report["layers"].items()
                     for k in ("weight_sqnr_db", "activation_sqnr_db") if row.get(k) is not None), default=(None, ""))
        gate("min_sqnr_db", worst[0], thresholds["min_sqnr_db"],
             worst[0] is None or worst[0] >= thresholds["min_sqnr_db"], worst[1])
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'gate':<18} {'value':>12} {'limit':>10}  result"]
    for r in rows:
        value = "n/a" if r["value"] is None else f"{r['value']:.6g}"
        lines.append(f"{r['gate']:<18} {value:>12} {r['limit']:>10.6g}  {'ok' if r['passed'] else 'FAILED'}"
                     + (f" ({r['where']})" if r["where"] else ""))
    return "\n".join(lines)


def load_report(path) -> dict:
    """A report from calibration.json, or from an artifact (directory or .v4c) that has one."""
    path = Path(path)
    try:
        if path.is_file() and path.suffix == ".json":
            return json.loads(path.read_text())
        from v4c.runtime.store import open_store
        store = open_store(path)
        if not store.exists(REPORT):
            raise V4CError(f"{path} has no {REPORT} (was it compiled with a calibration section?)")
        return json.loads(store.read(REPORT))
    except (OSError, json.JSONDecodeError) as e:
        raise V4CError(f"{path}: cannot read a report ({e})") from None


def diff(old: dict, new: dict, thresholds: dict, max_kl_increase=None, max_top1_drop=None) -> tuple[str, list[dict]]:
    """-> (what changed, as a table; gate rows for NEW and for the change from OLD to NEW)."""
    ho, hn = headline(old), headline(new)
    lines = [f"{'metric':<28} {'old':>12} {'new':>12} {'change':>12}"]
    for key, label, better in HEADLINE:
        a, b = ho.get(key), hn.get(key)
        if a is None or b is None:
            continue
        change = b - a
        worse = (change > 0) if better == "lower" else (change < 0)
        mark = "  worse" if worse and abs(change) > 1e-12 else ""
        lines.append(f"{label:<28} {a:>12.6g} {b:>12.6g} {change:>+12.4g}{mark}")
    rows = check(new, thresholds)
    if max_kl_increase is not None:
        rows.append({"gate": "max_kl_increase", "value": hn["kl_mean"] - ho["kl_mean"], "limit": max_kl_increase,
                     "passed": hn["kl_mean"] - ho["kl_mean"] <= max_kl_increase, "where": ""})
    if max_top1_drop is not None:
        rows.append({"gate": "max_top1_drop", "value": ho["top1"] - hn["top1"], "limit": max_top1_drop,
                     "passed": ho["top1"] - hn["top1"] <= max_top1_drop, "where": ""})
    return "\n".join(lines), rows

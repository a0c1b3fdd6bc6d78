"""Small inline-SVG charts for the self-contained HTML report (no plotting library needed)."""

from html import escape

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 640, 240, 56, 16, 28, 48
COLORS = ["#2b6cb0", "#dd6b20", "#38a169", "#805ad5", "#c53030", "#718096"]


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _frame(title: str, lo: float, hi: float, unit: str, height: int = H) -> list[str]:
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" '
             'font-family="sans-serif" font-size="11">',
             f'<text x="{PAD_L}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>']
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        y = height - PAD_B - (height - PAD_T - PAD_B) * k / 4
        parts.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e2e8f0"/>')
        parts.append(f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(v)}</text>')
    parts.append(f'<text x="12" y="{height / 2}" transform="rotate(-90 12 {height / 2})" text-anchor="middle">'
                 f'{escape(unit)}</text>')
    return parts


def _range(values, from_zero: bool = True) -> tuple[float, float]:
    vals = [v for v in values if v is not None]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if from_zero:
        lo = min(lo, 0.0)
    if hi == lo:
        return lo - 0.5, hi + 0.5
    margin = (hi - lo) * 0.08
    return (lo if from_zero else lo - margin), hi + margin


def _legend(names, x0: float) -> list[str]:
    return [f'<rect x="{x0 + 110 * i}" y="{H - 14}" width="10" height="10" fill="{COLORS[i % len(COLORS)]}"/>'
            f'<text x="{x0 + 110 * i + 14}" y="{H - 5}">{escape(n)}</text>' for i, n in enumerate(names)]


def bar_chart(title: str, labels: list[str], series: dict[str, list], unit: str = "", threshold: float | None = None) -> str:
    lo, hi = _range([v for vs in series.values() for v in vs] + ([threshold] if threshold is not None else []))
    parts = _frame(title, lo, hi, unit)
    n, k = max(len(labels), 1), max(len(series), 1)
    slot = (W - PAD_L - PAD_R) / n
    bar = slot * 0.8 / k
    scale = (H - PAD_T - PAD_B) / (hi - lo)
    zero = H - PAD_B - (0 - lo) * scale
    for j, (name, values) in enumerate(series.items()):
        for i, v in enumerate(values):
            if v is None:
                continue
            x = PAD_L + slot * i + slot * 0.1 + bar * j
            y = H - PAD_B - (v - lo) * scale
            parts.append(f'<rect x="{x:.1f}" y="{min(y, zero):.1f}" width="{bar:.1f}" height="{abs(zero - y):.1f}" '
                         f'fill="{COLORS[j % len(COLORS)]}"><title>{escape(labels[i])} {escape(name)}: '
                         f'{_fmt(v)} {escape(unit)}</title></rect>')
    step = max(1, n // 24)
    for i in range(0, len(labels), step):
        parts.append(f'<text x="{PAD_L + slot * (i + 0.5):.1f}" y="{H - PAD_B + 14}" text-anchor="middle">'
                     f'{escape(labels[i])}</text>')
    if threshold is not None:
        y = H - PAD_B - (threshold - lo) * scale
        parts.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#c53030" '
                     f'stroke-dasharray="5,3"><title>gate: {_fmt(threshold)}</title></line>')
    return "\n".join(parts + _legend(list(series), PAD_L) + ["</svg>"])


def line_chart(title: str, xs: list[float], series: dict[str, list], unit: str = "", xlabel: str = "",
               from_zero: bool = True) -> str:
    lo, hi = _range([v for vs in series.values() for v in vs], from_zero)
    parts = _frame(title, lo, hi, unit)
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0, 1)
    x_hi = x_hi if x_hi > x_lo else x_lo + 1
    sx = (W - PAD_L - PAD_R) / (x_hi - x_lo)
    sy = (H - PAD_T - PAD_B) / (hi - lo)
    for j, values in enumerate(series.values()):
        pts = " ".join(f"{PAD_L + (x - x_lo) * sx:.1f},{H - PAD_B - (v - lo) * sy:.1f}" for x, v in zip(xs, values))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{COLORS[j % len(COLORS)]}" stroke-width="2"/>')
    for k in range(5):
        x = x_lo + (x_hi - x_lo) * k / 4
        parts.append(f'<text x="{PAD_L + (x - x_lo) * sx:.1f}" y="{H - PAD_B + 14}" text-anchor="middle">{_fmt(x)}</text>')
    parts.append(f'<text x="{W / 2}" y="{H - PAD_B + 28}" text-anchor="middle">{escape(xlabel)}</text>')
    return "\n".join(parts + _legend(list(series), PAD_L) + ["</svg>"])


def heatmap(title: str, rows: list[str], cols: int, values: list[list[float]], flagged: list[list[int]]) -> str:
    cell = min(28.0, (W - PAD_L - PAD_R) / max(cols, 1))
    height = PAD_T + cell * len(rows) + 40
    vmax = max((v for row in values for v in row), default=1) or 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height:.0f}" font-family="sans-serif" '
             f'font-size="11"><text x="{PAD_L}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>']
    for r, (label, row) in enumerate(zip(rows, values)):
        y = PAD_T + r * cell
        parts.append(f'<text x="{PAD_L - 6}" y="{y + cell * 0.65:.1f}" text-anchor="end">{escape(label)}</text>')
        for c, v in enumerate(row):
            shade = int(235 - 190 * (v / vmax))
            bad = c in flagged[r]
            parts.append(f'<rect x="{PAD_L + c * cell:.1f}" y="{y:.1f}" width="{cell - 1:.1f}" height="{cell - 1:.1f}" '
                         f'fill="rgb({shade},{shade + 10 if shade < 245 else 255},255)" '
                         f'stroke="{"#c53030" if bad else "none"}" stroke-width="2"><title>{escape(label)} expert {c}: '
                         f'{int(v)} tokens{" (flagged)" if bad else ""}</title></rect>')
    for c in range(0, cols, max(1, cols // 16)):
        parts.append(f'<text x="{PAD_L + (c + 0.5) * cell:.1f}" y="{PAD_T + len(rows) * cell + 14:.1f}" '
                     f'text-anchor="middle">{c}</text>')
    parts.append(f'<text x="{PAD_L}" y="{height - 6:.0f}">experts (red outline: fewer tokens than the flag threshold)</text>')
    return "\n".join(parts + ["</svg>"])


def histogram(title: str, lo: float, hi: float, counts: list[int]) -> str:
    w, h = 300, 150
    top = max(counts) or 1
    bw = (w - 20) / max(len(counts), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="10">',
             f'<text x="4" y="12" font-weight="bold">{escape(title)}</text>']
    for i, c in enumerate(counts):
        bh = (h - 40) * (c / top) ** 0.5  # square-root scale keeps the tails visible
        parts.append(f'<rect x="{10 + i * bw:.1f}" y="{h - 22 - bh:.1f}" width="{max(bw - 0.5, 0.5):.1f}" '
                     f'height="{bh:.1f}" fill="{COLORS[0]}"/>')
    parts.append(f'<text x="10" y="{h - 8}">{_fmt(lo)}</text><text x="{w - 10}" y="{h - 8}" '
                 f'text-anchor="end">{_fmt(hi)}</text></svg>')
    return "\n".join(parts)

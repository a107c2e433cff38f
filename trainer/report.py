"""A run's report: one self-contained HTML file with its metrics, epochs, plots and configuration.

Self-contained so that it can be mailed or attached to a ticket as it is: images are embedded as
base64 data: URIs, the CSS is inline, and nothing is fetched from anywhere (no scripts, no links).
"""

from __future__ import annotations

import base64
import html
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path

from serving.files import write_atomic

REPORT_NAME = "report.html"
EPOCH_COLUMNS = ("epoch", "trn_loss", "val_loss", "accuracy")
# Magic bytes of the formats a browser shows inline; anything else is reported, not embedded.
_MIME = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; } .missing { color: #b00; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value) -> str:
    """A cell's text: floats to 5 decimals (as EpochStats.line prints them), or in scientific
    notation when that would hide them (an lr of 1e-6); containers as compact JSON."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        value = float(value)  # numpy's float32 is not a Python float
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.5f}" if value == 0 or 1e-3 <= abs(value) < 1e6 else f"{value:.3e}"
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _table(header: Sequence, rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(_fmt(v))}</td>" for v in row) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _image(run_dir: Path, caption: str, png: str | Path) -> str:
    path = Path(png) if Path(png).is_absolute() else run_dir / png
    try:
        data = path.read_bytes()
    except OSError:
        return f'<p class="missing">{_esc(caption)}: missing: {_esc(png)}</p>'
    mime = next((m for magic, m in _MIME.items() if data.startswith(magic)), None)
    if mime is None:
        return f'<p class="missing">{_esc(caption)}: not a PNG or JPEG image: {_esc(png)}</p>'
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return f'<figure><img src="{uri}" alt="{_esc(caption)}">\n<figcaption>{_esc(caption)}</figcaption></figure>'


def write_report(
    run_dir: Path | str,
    *,
    title: str,
    config: Mapping,
    metrics: Mapping,
    history: Sequence[Mapping],
    images: Sequence[tuple[str, str | Path]],
    tables: Mapping[str, Sequence[Sequence]] | None = None,
) -> Path:
    """Write `run_dir/report.html` (atomically; the folder is created if needed) and return its path.

    The page shows, in order: `title`; `metrics` as a name/value table; `history` as one row per
    epoch (keys epoch, trn_loss, val_loss, accuracy; a missing key leaves its cell empty); every
    (caption, path) in `images`, path relative to `run_dir` or absolute, embedded as a data: URI (a
    file that is missing or not a PNG/JPEG is listed by name instead of failing the report); the
    resolved `config` as JSON; and each of `tables` under its name, its first row the header.
    All text is HTML-escaped; the page loads nothing from outside itself."""
    run_dir = Path(run_dir)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        "<h2>Metrics</h2>",
        _table(("metric", "value"), list(metrics.items())) if metrics else "<p>(no metrics)</p>",
        "<h2>Epochs</h2>",
    ]
    if history:
        parts.append(_table(EPOCH_COLUMNS, [[row.get(k, "") for k in EPOCH_COLUMNS] for row in history]))
    else:
        parts.append("<p>(no epochs)</p>")
    if images:
        parts.append("<h2>Plots</h2>")
        parts.extend(_image(run_dir, caption, png) for caption, png in images)
    # default=str: a Path or an enum in the config is shown rather than failing the report.
    config_json = json.dumps(config, indent=2, default=str)
    parts += ["<h2>Configuration</h2>", f"<pre>{_esc(config_json)}</pre>"]
    for name, rows in (tables or {}).items():
        parts.append(f"<h2>{_esc(name)}</h2>")
        parts.append(_table(rows[0], rows[1:]) if rows else "<p>(empty)</p>")
    parts.append("</body></html>\n")
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / REPORT_NAME
    write_atomic(out, "\n".join(parts).encode("utf-8"))
    return out

"""A run's report: one self-contained HTML file with its data, metrics, epochs, plots and configuration.

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

from serving.bundle.files import write_atomic
from trainer.evaluate.calibrate import calibration_line

REPORT_NAME = "report.html"
# The order of the epoch table's columns; only those some row has are shown, any others after them.
EPOCH_COLUMNS = ("epoch", "stage", "trn_loss", "val_loss", "accuracy", "seconds")
SPLITS = ("train", "valid", "test")
# Beyond this many classes a list of names is a wall of text; the count alone is shown.
MAX_LISTED_CLASSES = 20
# Magic bytes of the formats a browser shows inline; anything else is reported, not embedded.
_MIME = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } .summary { font-size: 1.15em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; } .missing { color: #b00; }
.warning { background: #fff4e0; border-left: 4px solid #e69500; padding: 0.5em 1em; }
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


def _data_rows(summary: Mapping) -> list[tuple[str, object]]:
    """Name/value rows for the data summary: classes, images per split, whether validation is held out."""
    rows: list[tuple[str, object]] = []
    classes = summary.get("classes")
    if isinstance(classes, numbers.Integral):
        rows.append(("classes", classes))
    elif classes is not None:
        names = [str(c) for c in classes]
        rows.append(("classes", len(names)))
        if len(names) <= MAX_LISTED_CLASSES:
            rows.append(("class names", ", ".join(names)))
    images = summary.get("images") or {}
    for split in [s for s in SPLITS if s in images] + [s for s in images if s not in SPLITS]:
        rows.append((f"{split} images", images[split]))
    if "held_out" in summary:
        held_out = summary["held_out"]
        rows.append(("validation held out", "yes" if held_out else "no: the model trained on these images too"))
    rows += [(str(k), v) for k, v in summary.items() if k not in ("classes", "images", "held_out")]
    return rows


def _epoch_table(history: Sequence[Mapping]) -> str:
    present = {k for row in history for k in row}
    extra = dict.fromkeys(k for row in history for k in row if k not in EPOCH_COLUMNS)
    columns = [c for c in EPOCH_COLUMNS if c in present] + list(extra)

    def cell(column: str, value: object) -> object:
        # Wall time to a tenth of a second: five decimals of a second are noise.
        if column == "seconds" and isinstance(value, numbers.Real) and not isinstance(value, bool):
            return f"{float(value):.1f}"
        return value

    return _table(columns, [[cell(c, row.get(c, "")) for c in columns] for row in history])


def write_report(
    run_dir: Path | str,
    *,
    title: str,
    config: Mapping,
    metrics: Mapping,
    history: Sequence[Mapping],
    images: Sequence[tuple[str, str | Path]],
    tables: Mapping[str, Sequence[Sequence]] | None = None,
    data_summary: Mapping | None = None,
    most_confused: Sequence[tuple[str, str, int]] | None = None,
    summary: str | None = None,
    warnings: Sequence[str] = (),
) -> Path:
    """Write `run_dir/report.html` (atomically; the folder is created if needed) and return its path.

    The page shows, in order: `title`; `summary`, one line a person reads first, when given; each of
    `warnings` (the data check's, trainer.audit.check) in a box; `data_summary` when given, as rows: "classes" (a list of
    names, or a count; the names are listed when there are at most MAX_LISTED_CLASSES), "images" (a mapping split ->
    count, shown train, valid, test, then any others), "held_out" and any other keys as they are;
    `metrics` as a name/value table, headed by a plain warning when `data_summary["held_out"]` is
    False (the model trained on its validation images, `--full`, so the scores are not held out);
    `most_confused` when given, as (actual, predicted, count) rows (trainer.evaluate.metrics.most_confused);
    `history` as one row per epoch with the columns of EPOCH_COLUMNS that any row has, in that order,
    then any other keys (a key a row lacks leaves its cell empty); every (caption, path) in `images`,
    path relative to `run_dir` or absolute, embedded as a data: URI (a file that is missing or not a
    PNG/JPEG is listed by name instead of failing the report); the resolved `config` as JSON; and
    each of `tables` under its name, its first row the header.
    All text is HTML-escaped; the page loads nothing from outside itself."""
    run_dir = Path(run_dir)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
    ]
    if summary:
        parts.append(f'<p class="summary"><strong>{_esc(summary)}</strong></p>')
    if warnings:
        items = "".join(f"<li>{_esc(w)}</li>" for w in warnings)
        parts.append(f'<div class="warning"><strong>Check the data:</strong><ul>{items}</ul></div>')
    if data_summary is not None:
        parts += ["<h2>Data</h2>", _table(("data", "value"), _data_rows(data_summary))]
    parts.append("<h2>Metrics</h2>")
    if data_summary is not None and "held_out" in data_summary and not data_summary["held_out"]:
        parts.append(
            '<p class="warning"><strong>These validation scores are NOT held out:</strong> this run trained '
            "on its validation images too (<code>--full</code>), so they are scores on images the model has "
            "seen and overstate how it will do on new images.</p>"
        )
    parts.append(_table(("metric", "value"), list(metrics.items())) if metrics else "<p>(no metrics)</p>")
    if "temperature" in metrics:
        parts.append(
            f"<p>Calibration: {_esc(calibration_line(metrics))}. The bundle's graph divides its logits by this "
            "temperature, so the probabilities it serves are the calibrated ones (calibration.png shows both).</p>"
        )
    if most_confused is not None:
        parts.append("<h2>Most confused pairs (actual, predicted, count)</h2>")
        if most_confused:
            parts.append(_table(("actual", "predicted", "count"), most_confused))
        else:
            parts.append("<p>(no confused pairs)</p>")
    parts += ["<h2>Epochs</h2>", _epoch_table(history) if history else "<p>(no epochs)</p>"]
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

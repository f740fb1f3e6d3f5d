"""Text and table rows the app shows, from the server's JSON answers: Markdown for
predictions, jobs and gate decisions, and the rows of every Dataframe."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

HEADLINE_METRICS = (
    ("val/f1_macro", "val F1"),
    ("val/acc", "val acc"),
    ("test/f1_macro", "test F1"),
    ("test/acc", "test acc"),
)
MODEL_HEADERS = ["current", "version", "created", *(n for _, n in HEADLINE_METRICS), "parent"]


def fmt(value: Any) -> str:
    """A table cell: floats to 3 decimals, None as an em dash."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int | float):
        return f"{value:.3f}" if isinstance(value, float) else str(value)
    return str(value)


def scalar_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """The numeric entries of a metrics dict, as floats (booleans and text dropped)."""
    return {
        k: float(v)
        for k, v in (metrics or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def metrics_md(metrics: Mapping[str, Any] | None) -> str:
    """The headline metrics on one Markdown line."""
    scalars = scalar_metrics(metrics)
    parts = [f"{name} **{scalars[key]:.3f}**" for key, name in HEADLINE_METRICS if key in scalars]
    return " · ".join(parts) if parts else "no metrics recorded"


def error_md(message: str) -> str:
    """An error message as the app shows it in place of a result."""
    return f"⚠️ **{message}**"


def prediction_markdown(result: Mapping[str, Any]) -> str:
    """A /predict answer as a heading (the label) and one line of details."""
    label = result.get("label", "?")
    confidence = float(result.get("confidence", 0.0))
    windows = result.get("windows") or []
    extra = f" · {len(windows)} windows" if len(windows) > 1 else ""
    return (
        f"## {label}\n"
        f"confidence **{confidence:.1%}** · model **{result.get('version', '?')}** · "
        f"{float(result.get('duration_s', 0.0)):.1f} s{extra}"
    )


def upload_rows(result: Mapping[str, Any]) -> list[list[str]]:
    """An /upload answer as [file, result, detail] rows, one per file."""
    rows = []
    for item in result.get("results", []):
        if item.get("status") == "rejected":
            detail = item.get("error", "")
        else:
            detail = f"sha256 {str(item.get('sha256', ''))[:12]}…"
        rows.append([str(item.get("filename", "")), str(item.get("status", "")), detail])
    return rows


def ordered_labels(labels: Sequence[str] | None, *found: Mapping[str, Any] | None) -> list[str]:
    """`labels` (the model's, in its order), then any other key of the `found` mappings in
    the order they appear: every label a view has something for, none assumed."""
    out = list(labels or [])
    for mapping in found:
        out += [k for k in (mapping or {}) if k not in out]
    return out


def count_rows(
    counts: Mapping[str, Any] | None, labels: Sequence[str] | None = None
) -> list[list[Any]]:
    """[label, count] rows: every one of `labels` (0 where `counts` has none), then the
    other labels `counts` has."""
    counts = counts or {}
    return [[label, int(counts.get(label, 0))] for label in ordered_labels(labels, counts)]


def model_rows(models: Mapping[str, Any]) -> list[list[Any]]:
    """A /models answer as MODEL_HEADERS rows, newest version first."""
    rows = []
    for v in reversed(models.get("versions", [])):  # newest first
        metrics = scalar_metrics(v.get("metrics"))
        rows.append(
            [
                "yes" if v.get("current") else "",
                v.get("version", "?"),
                str(v.get("created_at") or "")[:19],
            ]
            + [fmt(metrics.get(key)) for key, _ in HEADLINE_METRICS]
            + [v.get("parent_version") or "—"]
        )
    return rows


def history_rows(models: Mapping[str, Any]) -> list[list[str]]:
    """The registry history of a /models answer as [when, action, version, reason], newest first."""
    rows = []
    for h in reversed(models.get("history") or []):
        rows.append(
            [
                str(h.get("at") or h.get("time") or h.get("created_at") or "")[:19],
                str(h.get("action", "")),
                str(h.get("version", "")),
                str(h.get("reason", "")),
            ]
        )
    return rows


def comparison_rows(decision: Mapping[str, Any]) -> list[list[str]]:
    """A gate decision as [metric, current, new, change] rows, headline metrics first."""
    new = scalar_metrics(decision.get("new_metrics"))
    cur = scalar_metrics(decision.get("current_metrics"))
    keys = [k for k, _ in HEADLINE_METRICS if k in new or k in cur]
    keys += sorted((set(new) | set(cur)) - set(keys))
    rows = []
    for key in keys:
        delta = new[key] - cur[key] if key in new and key in cur else None
        rows.append(
            [key, fmt(cur.get(key)), fmt(new.get(key)), "—" if delta is None else f"{delta:+.3f}"]
        )
    return rows


def job_markdown(job: Mapping[str, Any]) -> str:
    """A retrain job's state, progress, metrics and error as Markdown."""
    state = job.get("state", "?")
    epoch, max_epochs = job.get("epoch"), job.get("max_epochs")
    progress = f" · epoch {epoch}/{max_epochs}" if epoch is not None and max_epochs else ""
    lines = [f"### job `{job.get('job_id', '?')}`: {state}{progress}"]
    if job.get("metrics"):
        lines.append(metrics_md(job["metrics"]))
    if job.get("error"):
        lines.append(error_md(str(job["error"])))
    return "\n\n".join(lines)


def decision_markdown(decision: Mapping[str, Any] | None) -> str:
    """The gate's decision in one line: promoted or kept, and why."""
    if not decision:
        return ""
    if decision.get("promoted"):
        head = (
            f"**Promoted** {decision.get('version') or decision.get('new_version') or ''}".rstrip()
        )
    else:
        head = "**Kept the current model**"
    return f"{head}: {decision.get('reason', '')}"


def per_label_rows(
    per_label: Mapping[str, Mapping[str, Any]], labels: Sequence[str] | None = None
) -> list[list[str]]:
    """[label, precision, recall, F1, support] rows, one per label (`labels` first)."""
    return [
        [
            label,
            *(
                fmt(per_label.get(label, {}).get(k))
                for k in ("precision", "recall", "f1", "support")
            ),
        ]
        for label in ordered_labels(labels, per_label)
    ]


def upload_summary(label: str, rows: list[list[str]]) -> str:
    """One line counting the files of an upload by result ("2 stored, 1 rejected")."""
    by_status: dict[str, int] = {}
    for row in rows:
        by_status[row[1]] = by_status.get(row[1], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) or "nothing uploaded"
    return f"Uploaded as **{label}**: {summary}."


def log_tail_text(job: Mapping[str, Any]) -> str:
    """A job's log tail (a list of lines, or text) as one text block."""
    tail = job.get("log_tail")
    return "\n".join(tail) if isinstance(tail, list) else str(tail or "")


def example_markdown(label: str, name: str, reading: Mapping[str, str]) -> str:
    """An Insights example: the label, its clip's name, and one reading per view."""
    return (
        f"**{label}** (`{name}`)\n\n"
        f"- *waveform*: {reading['waveform']}\n- *log-mel*: {reading['logmel']}\n"
        f"- *MFCC*: {reading['mfcc']}"
    )


def labels_markdown(version: str | None, labels: Sequence[str]) -> str:
    """The line naming what the served model tells apart."""
    if not labels:
        return "Labels: unknown until the server answers (refresh the page)."
    return f"Model **{version or '?'}** tells apart: " + ", ".join(f"`{x}`" for x in labels)

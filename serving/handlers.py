"""The app's event handlers, one module-level function per button (and page load).

Each takes the `AppContext` first (bound with `functools.partial` when `serving/app.py`
wires it) and then the values of its input components, and returns the values of its
output components in order; the retrain handlers are generators that yield each update.
They call the server through `ctx.client` and never raise for a server or audio error:
the message goes into the output (and a toast), so a handler can be called without a
browser and its outputs checked.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from faultsense.errors import FaultSenseError
from faultsense.figures import confusion_figure

from .client import ServerClient, ServerError
from .formatting import (
    comparison_rows,
    count_rows,
    decision_markdown,
    error_md,
    example_markdown,
    history_rows,
    job_markdown,
    labels_markdown,
    log_tail_text,
    metrics_md,
    model_rows,
    per_label_rows,
    prediction_markdown,
    upload_rows,
    upload_summary,
)
from .views import (
    clip_figure,
    clip_readings,
    curves_figure,
    distribution_figure,
    find_examples,
    load_clip,
    monitor_figure,
    timeline_figure,
)

TERMINAL_STATES = ("succeeded", "failed")


@dataclass(frozen=True)
class AppContext:
    """What every handler shares: the server client and the app's settings (app.yaml)."""

    client: ServerClient
    views: dict[str, Any]  # `views:` display settings (window, bands, reading thresholds)
    example_dirs: Sequence[str | Path]  # where the example clips are looked up, in order
    poll_s: float = 1.0  # how often a followed retrain job is polled
    follow_timeout_s: float = 7200.0  # stop following a job after this long
    # Example rows the Insights tab has (fixed when the page is built); 0 = one per label.
    example_slots: int = 0


def model_labels(status: dict[str, Any]) -> list[str]:
    """The current model's labels from a /status answer ([] when it has none)."""
    return [str(label) for label in (status.get("model") or {}).get("labels") or []]


def current_labels(ctx: AppContext) -> list[str]:
    """The labels of the model the server serves now ([] when it cannot be asked): asked
    per request, so a hot promote of a model with other labels shows at the next call."""
    try:
        return model_labels(ctx.client.status())
    except ServerError:
        return []


def warn(err: Exception, toast: bool = True) -> str:
    """`err` as the Markdown that replaces a result, and (with `toast`) a warning toast."""
    if toast:
        gr.Warning(str(err))
    return error_md(str(err))


def refuse(message: str) -> str:
    """A user mistake (nothing chosen): a warning toast and the same text as Markdown."""
    gr.Warning(message)
    return error_md(message)


# -- Predict ---------------------------------------------------------------------------


def predict(ctx: AppContext, audio_path: str | None) -> tuple[Any, ...]:
    """Clip -> (prediction Markdown, probabilities, clip figure, timeline update)."""
    hidden = gr.update(value=None, visible=False)
    if not audio_path:
        return refuse("Upload or record a clip first."), None, None, hidden
    try:
        wave, sr = load_clip(audio_path, float(ctx.views["max_seconds"]))
        figure = clip_figure(wave, sr, ctx.views, title=Path(audio_path).name)
    except FaultSenseError as err:
        return warn(err), None, None, hidden
    try:
        result = ctx.client.predict(audio_path)
    except ServerError as err:
        return warn(err), None, figure, hidden
    windows = result.get("windows") or []
    timeline = (
        gr.update(value=timeline_figure(windows), visible=True) if len(windows) > 1 else hidden
    )
    return prediction_markdown(result), result.get("probabilities") or {}, figure, timeline


# -- Upload ----------------------------------------------------------------------------


def upload(ctx: AppContext, files: list[str] | None, label: str | None) -> tuple[Any, ...]:
    """Files + label -> (summary Markdown, per-file rows, uploads-per-label rows)."""
    if not files:
        return refuse("Choose one or more audio files to upload."), [], gr.update()
    if not label:
        known = ", ".join(current_labels(ctx)) or "the server's model is not reachable"
        return refuse(f"Choose the label of these recordings (one of: {known})."), [], gr.update()
    try:
        result = ctx.client.upload(files, label)
    except ServerError as err:
        if not (isinstance(err.body, dict) and "results" in err.body):
            return warn(err), [], gr.update()
        result = err.body  # every file was rejected: the table says why, per file
    rows = upload_rows(result)
    return upload_summary(label, rows), rows, count_rows(result.get("counts"))


# -- Retrain ---------------------------------------------------------------------------


def follow(ctx: AppContext, job_id: str) -> Iterator[tuple[Any, ...]]:
    """Poll a retrain job until it ends (or ctx.follow_timeout_s); yield
    (job Markdown, decision Markdown, comparison rows, log tail) at each poll."""
    deadline = time.monotonic() + ctx.follow_timeout_s
    while True:
        try:
            job = ctx.client.retrain_job(job_id)
        except ServerError as err:
            yield warn(err), "", [], ""
            return
        decision = job.get("decision") or {}
        yield (
            job_markdown(job),
            decision_markdown(decision),
            comparison_rows(decision) if decision else [],
            log_tail_text(job),
        )
        if job.get("state") in TERMINAL_STATES:
            return
        if time.monotonic() > deadline:
            stopped = f"Stopped following job {job_id}; it is still on the server."
            yield error_md(stopped), "", [], ""
            return
        time.sleep(ctx.poll_s)


def retrain(ctx: AppContext, epochs: float | None, force: bool) -> Iterator[tuple[Any, ...]]:
    """Start a retrain job (0 epochs: the server's default) and follow it; if one is
    already running, follow that one instead."""
    try:
        job_id = ctx.client.start_retrain(int(epochs) if epochs else None, force)["job_id"]
    except ServerError as err:
        job_id = err.body.get("job_id") if isinstance(err.body, dict) else None
        if err.status != 409 or not job_id:
            yield warn(err), "", [], ""
            return
        gr.Info(f"Retraining job {job_id} is already running: following it.")
    yield from follow(ctx, str(job_id))


def follow_latest(ctx: AppContext) -> Iterator[tuple[Any, ...]]:
    """Follow the server's latest retrain job, whoever started it."""
    try:
        job_id = (ctx.client.status().get("retrain") or {}).get("job_id")
    except ServerError as err:
        yield warn(err), "", [], ""
        return
    if not job_id:
        yield "No retrain job has run on this server yet.", "", [], ""
        return
    yield from follow(ctx, str(job_id))


# -- Models ----------------------------------------------------------------------------


def models_view(ctx: AppContext, message: str = "", toast: bool = True) -> tuple[Any, ...]:
    """(status Markdown, version rows, history rows, version dropdown update); `message`
    replaces the default status line."""
    try:
        models = ctx.client.models()
    except ServerError as err:
        return warn(err, toast), [], [], gr.update()
    versions = [v.get("version") for v in models.get("versions", []) if v.get("version")]
    current = models.get("current")
    head = message or f"Serving **{current or 'nothing'}** · {len(versions)} version(s) registered."
    return (
        head,
        model_rows(models),
        history_rows(models),
        gr.update(choices=versions[::-1], value=current if current in versions else None),
    )


def promote(ctx: AppContext, version: str | None) -> tuple[Any, ...]:
    """Make `version` current; the Models view after it."""
    if not version:
        return models_view(ctx, refuse("Choose a version to promote."))
    try:
        current = ctx.client.promote(version).get("current")
    except ServerError as err:
        return models_view(ctx, warn(err))
    gr.Info(f"{current} is now current.")
    return models_view(ctx, f"Promoted **{current}**: it serves from the next batch.")


def rollback(ctx: AppContext) -> tuple[Any, ...]:
    """Make the previous version current; the Models view after it."""
    try:
        current = ctx.client.rollback().get("current")
    except ServerError as err:
        return models_view(ctx, warn(err))
    gr.Info(f"Rolled back to {current}.")
    return models_view(ctx, f"Rolled back: **{current}** is current.")


# -- Insights --------------------------------------------------------------------------


def examples_view(ctx: AppContext, labels: Sequence[str] | None) -> tuple[list[str], list[Any]]:
    """One (Markdown, figure) per label of `labels` (None: every label folder found) for
    the local example clips, padded with ("", None) to `ctx.example_slots`; no server."""
    examples = find_examples(ctx.example_dirs, labels)
    names = list(examples) if labels is None else list(labels)
    slots = ctx.example_slots or len(names)
    texts: list[str] = []
    figures: list[Any] = []
    for label in names[:slots]:
        text, figure = example_view(ctx, label, examples.get(label))
        texts.append(text)
        figures.append(figure)
    if len(names) > slots:
        texts[-1] += (
            f"\n\n*{len(names) - slots} more label(s) have no example row "
            f"({', '.join(names[slots:])}): restart the app to add rows.*"
        )
    pad = slots - len(texts)
    return texts + [""] * pad, figures + [None] * pad


def example_view(ctx: AppContext, label: str, path: Path | None) -> tuple[str, Any]:
    """The Markdown reading and the figure of one label's example clip (or why there is none)."""
    if path is None:
        folders = ", ".join(map(str, ctx.example_dirs)) or "no example folder"
        return f"**{label}**: no example clip in {folders}.", None
    try:
        wave, sr = load_clip(path, float(ctx.views["max_seconds"]))
    except FaultSenseError as err:
        return error_md(str(err)), None
    text = example_markdown(label, path.name, clip_readings(wave, sr, ctx.views))
    return text, clip_figure(wave, sr, ctx.views, mfcc=True, title=f"{label}: {path.name}")


def report_view(status: dict[str, Any], report: dict[str, Any]) -> tuple[Any, ...]:
    """The current model's report as (notes Markdown, distribution, curves, confusion
    figures, per-label rows, upload rows), over the model's labels; a figure is None when
    the report lacks it."""
    model = status.get("model") or {}
    labels = model_labels(status)
    uploads = status.get("uploads") or report.get("uploads") or {}
    notes = [f"Current model **{model.get('version', '?')}** · {metrics_md(model.get('metrics'))}"]
    if not report:
        notes.append("This server has no /insights route: only upload statistics are shown.")
    for what, why in (report.get("missing") or {}).items():
        notes.append(f"No {what.replace('_', ' ')} for this model: {why}.")
    dataset = report.get("dataset") or {}
    has_uploads = any(int(n) for n in uploads.values())
    dist = None
    if dataset or has_uploads:
        dist = distribution_figure(dataset, uploads if has_uploads else None, labels)
    curves = curves_figure(report["curves"]) if report.get("curves") else None
    confusion = None
    if report.get("confusion_matrix"):
        cm = report["confusion_matrix"]
        title = f"confusion matrix ({cm.get('split', 'test')})"
        confusion = confusion_figure(cm["matrix"], cm.get("labels") or labels, title)
    per_label = per_label_rows(report["per_label"], labels) if report.get("per_label") else []
    return "\n\n".join(notes), dist, curves, confusion, per_label, count_rows(uploads, labels)


def insights(ctx: AppContext, toast: bool = True) -> tuple[Any, ...]:
    """The Insights tab: the report's outputs (`report_view`), then the example texts,
    then the example figures, for the labels of the model served now."""
    try:
        status = ctx.client.status()
        report = ctx.client.insights() or {}
    except ServerError as err:
        texts, figures = examples_view(ctx, None)
        return warn(err, toast), None, None, None, [], count_rows({}), *texts, *figures
    texts, figures = examples_view(ctx, model_labels(status))
    return *report_view(status, report), *texts, *figures


def shown_slots(*texts: str) -> list[Any]:
    """Visibility of each example row: shown when its slot has a text."""
    return [gr.update(visible=bool(text)) for text in texts]


def status_view(status: dict[str, Any] | None) -> tuple[Any, ...]:
    """(upload count rows, labels Markdown, label dropdown update) from a /status answer
    (None: the server did not answer): the served model's labels, as asked now."""
    if status is None:
        return count_rows({}), labels_markdown(None, []), gr.update()
    labels = model_labels(status)
    version = (status.get("model") or {}).get("version")
    return (
        count_rows(status.get("uploads"), labels),
        labels_markdown(version, labels),
        gr.update(choices=labels, value=None),
    )


def on_load(ctx: AppContext) -> tuple[Any, ...]:
    """Page load: the Models view, the upload counts and the current model's labels (line
    and upload dropdown), with one toast at most when the server is down."""
    models = models_view(ctx, toast=False)
    if models[0].startswith("⚠️"):
        gr.Warning(models[0].strip("⚠️ *"))
    try:
        status = ctx.client.status()
    except ServerError:
        status = None
    return (*models, *status_view(status))


# -- Monitor ---------------------------------------------------------------------------


def monitor(ctx: AppContext, toast: bool = True) -> tuple[Any, ...]:
    """The Monitor tab: the drift state (Markdown), the figure (predictions over time,
    confidence), and the recent label counts against the reference as table rows."""
    try:
        report = ctx.client.monitor()
    except ServerError as err:
        return warn(err, toast), None, []
    return monitor_markdown(report), monitor_figure(report), monitor_rows(report)


def monitor_markdown(report: dict[str, Any]) -> str:
    """The drift state first (what an operator acts on), then how it was measured."""
    d = report.get("drift") or {}
    low = report.get("low_confidence") or {}
    state = d.get("state", "unknown")
    badge = "**drifting: true**" if d.get("drifting") else f"drifting: false ({state})"
    score = "n/a" if d.get("score") is None else f"{d['score']:.3f}"
    return (
        f"### {badge}\n"
        f"Model **{report.get('version')}**: PSI {score} (threshold {d.get('threshold')}) over "
        f"its last {d.get('predictions', 0)} predictions (window {d.get('window')}, judged from "
        f"{d.get('min_predictions')}); reference: {d.get('reference') or 'none recorded'}.  \n"
        f"Low confidence (< {low.get('threshold')}): **{100 * float(low.get('share') or 0):.1f}%** "
        f"({low.get('count', 0)}). Log records read: {report.get('records', 0)}."
    )


def monitor_rows(report: dict[str, Any]) -> list[list[Any]]:
    """[label, recent predictions, share] per label of the served model."""
    counts = (report.get("recent") or {}).get("labels") or {}
    n = sum(counts.values())
    return [[label, c, f"{100 * c / n:.1f}%" if n else "-"] for label, c in counts.items()]


# -- Monitor: the label queue ----------------------------------------------------------


def label_queue(ctx: AppContext, message: str = "", toast: bool = True) -> tuple[Any, ...]:
    """The label queue: (status Markdown, item rows, item dropdown update, label dropdown
    update); the first waiting item is chosen (its audio loads on change) and the label
    choices are the served model's. `message` replaces the status line."""
    try:
        queue = ctx.client.label_queue()
    except ServerError as err:
        return warn(err, toast), [], gr.update(choices=[], value=None), gr.update()
    items = queue.get("items") or []
    choices = [(queue_choice(item), str(item["id"])) for item in items]
    return (
        message or queue_markdown(queue),
        [queue_row(item) for item in items],
        gr.update(choices=choices, value=choices[0][1] if choices else None),
        gr.update(choices=[str(x) for x in queue.get("labels") or []], value=None),
    )


def queue_markdown(queue: dict[str, Any]) -> str:
    """How many clips wait, and why there may be none."""
    pending, shown = int(queue.get("pending") or 0), len(queue.get("items") or [])
    head = (
        f"**{pending}** low-confidence prediction(s) (< {queue.get('threshold')}) wait for a "
        f"label" + (f"; the newest {shown} are listed." if shown < pending else ".")
    )
    if queue.get("store_audio") == "none":
        head += " The server keeps no audio: set `monitor.store_audio=low_confidence` to fill it."
    return head


def queue_choice(item: dict[str, Any]) -> str:
    """One queued item as its dropdown entry."""
    confidence = float(item.get("confidence") or 0.0)
    return f"{str(item.get('time'))[:19]} · {item.get('predicted')} {confidence:.0%} · {item.get('filename') or item['id']}"


def queue_row(item: dict[str, Any]) -> list[Any]:
    """[time, predicted, confidence, file, model, id] of one queued item."""
    confidence = float(item.get("confidence") or 0.0)
    return [str(item.get("time"))[:19], item.get("predicted"), f"{confidence:.1%}",
            item.get("filename") or "", item.get("version"), item.get("id")]  # fmt: skip


def queue_item(ctx: AppContext, item_id: str | None) -> tuple[Any, str]:
    """A queued item's clip for gr.Audio ((rate, int16 samples) or None) and what the model
    said about it."""
    if not item_id:
        return None, ""
    try:
        data = ctx.client.queued_audio(item_id)
        wave, rate = load_clip(data, float(ctx.views["max_seconds"]), name=item_id)
    except FaultSenseError as err:  # ServerError included
        return None, warn(err)
    samples = (np.clip(wave, -1.0, 1.0) * 32767).astype(np.int16)
    return (rate, samples), f"Playing queued prediction `{item_id}`: pick its true label below."


def label_queued(ctx: AppContext, item_id: str | None, label: str | None) -> tuple[Any, ...]:
    """Label the chosen item (it becomes an upload for the next retrain); the queue after."""
    if not item_id or not label:
        return label_queue(ctx, refuse("Choose a queued clip and its label first."))
    try:
        result = ctx.client.label_queued(item_id, label)
    except ServerError as err:
        return label_queue(ctx, warn(err))
    upload = result.get("upload") or {}
    gr.Info(f"Stored as an upload labeled {label}.")
    done = (
        f"Labeled **{label}**: stored as an upload ({upload.get('status')}) for the next retrain."
    )
    return label_queue(ctx, done)


def dismiss_queued(ctx: AppContext, item_id: str | None) -> tuple[Any, ...]:
    """Take the chosen item out of the queue without labelling it; the queue after."""
    if not item_id:
        return label_queue(ctx, refuse("Choose a queued clip to dismiss."))
    try:
        ctx.client.dismiss_queued(item_id)
    except ServerError as err:
        return label_queue(ctx, warn(err))
    return label_queue(ctx, f"Dismissed `{item_id}`.")

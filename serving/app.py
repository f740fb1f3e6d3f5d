"""FaultSense web app (Gradio 6): predict, upload, retrain, models, insights, monitor.

The app is a client of the FaultSense server: every prediction, upload, retrain and
model switch is an HTTP call (`serving/client.py`); it never imports the model or torch.
This module is the layout and the wiring only: `serving/handlers.py` holds what each
button does, `serving/views.py` the display-only clip features and figures, and
`serving/formatting.py` the text and table rows.

    faultsense-app                       # http://127.0.0.1:7860, server at :8000
    faultsense-app port=7861 server_url=http://10.0.0.5:8000
"""

from __future__ import annotations

import logging
import os
from functools import partial
from typing import Any

import gradio as gr
import hydra
from omegaconf import DictConfig

from faultsense import CONFIG_DIR
from faultsense.config import plain, run_cli

from . import handlers
from .client import ServerClient, ServerError
from .formatting import MODEL_HEADERS, count_rows
from .handlers import AppContext
from .views import find_examples

# Gradio must never phone home: no analytics, no version check, no share tunnel.
# (Gradio reads this when the app launches, so setting it after the import is enough.)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

log = logging.getLogger(__name__)


def app_context(cfg: DictConfig, labels: list[str]) -> AppContext:
    """The client and settings every handler shares, from configs/app.yaml; `labels` (the
    served model's when the app starts) size the Insights example rows."""
    client = ServerClient(
        str(cfg.server_url), cfg.get("api_key") or None, float(cfg.request_timeout_s)
    )
    example_dirs = [d for d in (cfg.get("examples_dir"), cfg.get("fallback_examples_dir")) if d]
    # Gradio fixes the number of rows when the page is built; each page load fills them.
    slots = int(cfg.get("example_slots") or 0) or len(labels) or len(find_examples(example_dirs))
    return AppContext(
        client=client,
        views=plain(cfg.views),
        example_dirs=[str(d) for d in example_dirs],
        poll_s=float(cfg.retrain.poll_s),
        follow_timeout_s=float(cfg.retrain.follow_timeout_s),
        example_slots=slots,
    )


def starting_labels(cfg: DictConfig) -> list[str]:
    """The served model's labels as the app starts ([] when the server does not answer).
    They fill the first page's choices only: every page load asks again."""
    client = ServerClient(str(cfg.server_url), None, min(5.0, float(cfg.request_timeout_s)))
    try:
        return handlers.model_labels(client.status())
    except ServerError:
        return []


def predict_tab(ctx: AppContext, labels: list[str]) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Recording")
            predict_btn = gr.Button("Predict", variant="primary", elem_id="predict-button")
        with gr.Column(scale=1):
            prediction = gr.Markdown(
                "Upload or record a clip, then press **Predict**.", elem_id="prediction"
            )
            probabilities = gr.Label(
                num_top_classes=None, label="Probabilities", elem_id="probabilities"
            )
    clip_plot = gr.Plot(label="Waveform and log-mel spectrogram", elem_id="clip-plot")
    timeline_plot = gr.Plot(
        label="Timeline (long recordings)", visible=False, elem_id="timeline-plot"
    )
    examples = find_examples(ctx.example_dirs, labels or None)
    if examples:
        gr.Examples([[str(p)] for p in examples.values()], inputs=[audio], label="Example clips")
    predict_btn.click(
        partial(handlers.predict, ctx),
        [audio],
        [prediction, probabilities, clip_plot, timeline_plot],
        api_name="predict",
    )


def upload_tab(ctx: AppContext, labels: list[str]) -> tuple[gr.Dataframe, gr.Dropdown]:
    """The Upload tab; returns its uploads-per-label table and its label dropdown (both
    filled with the served model's labels on page load)."""
    gr.Markdown("Add labeled recordings; they join the training split at the next retrain.")
    with gr.Row():
        files = gr.File(
            file_count="multiple", type="filepath", label="Recordings", elem_id="upload-files"
        )
        with gr.Column():
            # The server checks the label against the model it serves at upload time (a
            # hot promote can change the labels): any value reaches it, and a refusal
            # names the labels it knows.
            label = gr.Dropdown(
                labels, label="Label of all these files", value=None, allow_custom_value=True,
                elem_id="upload-label",
            )  # fmt: skip
            upload_btn = gr.Button("Upload", variant="primary", elem_id="upload-button")
    status = gr.Markdown(elem_id="upload-status")
    table = gr.Dataframe(
        headers=["file", "result", "detail"], label="Per-file result", interactive=False, wrap=True
    )
    counts = gr.Dataframe(
        value=count_rows({}), headers=["label", "uploaded clips ready for retraining"],
        label="Uploads per label", interactive=False, elem_id="upload-counts",
    )  # fmt: skip
    upload_btn.click(
        partial(handlers.upload, ctx), [files, label], [status, table, counts], api_name="upload"
    )
    return counts, label


def retrain_tab(ctx: AppContext, default_epochs: int) -> None:
    gr.Markdown(
        "Fine-tune the current model on the training data plus uploads. The new "
        "version is promoted only if it passes the gate (or with *force*)."
    )
    with gr.Row():
        epochs = gr.Number(
            value=default_epochs, precision=0, minimum=0,
            label="Epochs (0: the server's default)",
        )  # fmt: skip
        force = gr.Checkbox(label="Force promotion (skip the gate)", value=False)
        retrain_btn = gr.Button("Retrain", variant="primary", elem_id="retrain-button")
        follow_btn = gr.Button("Follow latest job")
    outputs = [
        gr.Markdown("No retrain started from this page yet.", elem_id="retrain-status"),
        gr.Markdown(elem_id="retrain-decision"),
        gr.Dataframe(
            headers=["metric", "current model", "new model", "change"],
            label="Gate: current vs new",
            interactive=False,
        ),
        gr.Textbox(label="Log tail", lines=8, max_lines=8, interactive=False),
    ]
    retrain_btn.click(partial(handlers.retrain, ctx), [epochs, force], outputs, api_name="retrain")
    follow_btn.click(partial(handlers.follow_latest, ctx), None, outputs, api_name="follow_retrain")


def models_tab(ctx: AppContext) -> list[Any]:
    """The Models tab; returns its outputs (filled on page load)."""
    status = gr.Markdown(elem_id="models-status")
    table = gr.Dataframe(
        headers=MODEL_HEADERS,
        label="Versions (newest first)",
        interactive=False,
        elem_id="models-table",
    )
    with gr.Row():
        version = gr.Dropdown([], label="Version", interactive=True)
        promote_btn = gr.Button("Promote", variant="primary")
        rollback_btn = gr.Button("Roll back to previous", variant="stop")
        refresh_btn = gr.Button("Refresh")
    history = gr.Dataframe(
        headers=["when", "action", "version", "reason"],
        label="History",
        interactive=False,
        wrap=True,
    )
    outputs = [status, table, history, version]
    refresh_btn.click(partial(handlers.models_view, ctx), None, outputs, api_name="models")
    promote_btn.click(partial(handlers.promote, ctx), [version], outputs, api_name="promote")
    rollback_btn.click(partial(handlers.rollback, ctx), None, outputs, api_name="rollback")
    return outputs


def insights_tab(ctx: AppContext) -> tuple[list[Any], list[Any], list[Any]]:
    """The Insights tab; returns its outputs in `handlers.insights` order, the example
    texts and their rows (shown when filled)."""
    status = gr.Markdown(elem_id="insights-status")
    refresh_btn = gr.Button("Refresh")
    distribution = gr.Plot(label="Class distribution")
    curves = gr.Plot(label="Training curves of the current model", elem_id="insights-curves")
    with gr.Row():
        confusion = gr.Plot(label="Confusion matrix")
        with gr.Column():
            per_label = gr.Dataframe(
                headers=["label", "precision", "recall", "F1", "support"],
                label="Per-label metrics", interactive=False,
            )  # fmt: skip
            uploads = gr.Dataframe(
                value=count_rows({}), headers=["label", "uploaded clips"],
                label="Upload statistics", interactive=False,
            )  # fmt: skip
    gr.Markdown("### One example per label")
    texts, plots, rows = [], [], []
    for _ in range(ctx.example_slots):  # filled (and shown) per model label on each load
        with gr.Row(visible=False) as row:
            texts.append(gr.Markdown())
            plots.append(gr.Plot(label="waveform, log-mel, MFCC", show_label=False))
        rows.append(row)
    outputs = [status, distribution, curves, confusion, per_label, uploads, *texts, *plots]
    refreshed = refresh_btn.click(
        partial(handlers.insights, ctx), None, outputs, api_name="insights"
    )
    refreshed.then(handlers.shown_slots, texts, rows, api_visibility="private")
    return outputs, texts, rows


def monitor_tab(ctx: AppContext) -> list[Any]:
    """The Monitor tab: drift state, predictions over time, confidence (filled on load)."""
    status = gr.Markdown(elem_id="monitor-status")
    refresh_btn = gr.Button("Refresh", elem_id="monitor-refresh")
    figure = gr.Plot(label="Predictions over time and confidence", elem_id="monitor-plot")
    rows = gr.Dataframe(
        headers=["label", "recent predictions", "share"], label="Recent predictions per label",
        interactive=False, elem_id="monitor-labels",
    )  # fmt: skip
    outputs = [status, figure, rows]
    refresh_btn.click(partial(handlers.monitor, ctx), None, outputs, api_name="monitor")
    return outputs


def label_queue_part(ctx: AppContext) -> list[Any]:
    """The Monitor tab's label queue: listen to a low-confidence clip, pick its label (it
    becomes an upload for the next retrain) or dismiss it. Returns the queue's outputs
    (filled on load)."""
    gr.Markdown("### Label queue")
    status = gr.Markdown(elem_id="queue-status")
    rows = gr.Dataframe(
        headers=["time (UTC)", "predicted", "confidence", "file", "model", "id"],
        label="Low-confidence predictions waiting for a label (newest first)",
        interactive=False, elem_id="queue-table",
    )  # fmt: skip
    with gr.Row():
        item = gr.Dropdown([], label="Queued clip", interactive=True, elem_id="queue-item")
        refresh_btn = gr.Button("Refresh queue", elem_id="queue-refresh")
    with gr.Row():
        audio = gr.Audio(label="Listen", interactive=False, elem_id="queue-audio")
        with gr.Column():
            about = gr.Markdown(elem_id="queue-item-about")
            label = gr.Dropdown([], label="True label (the served model's)", elem_id="queue-label")
            with gr.Row():
                label_btn = gr.Button("Label → upload", variant="primary", elem_id="queue-submit")
                dismiss_btn = gr.Button("Dismiss", elem_id="queue-dismiss")
    outputs = [status, rows, item, label]
    refresh_btn.click(partial(handlers.label_queue, ctx), None, outputs, api_name="label_queue")
    item.change(partial(handlers.queue_item, ctx), [item], [audio, about], api_name="queue_item")
    label_btn.click(
        partial(handlers.label_queued, ctx), [item, label], outputs, api_name="label_queued"
    )
    dismiss_btn.click(
        partial(handlers.dismiss_queued, ctx), [item], outputs, api_name="dismiss_queued"
    )
    return outputs


def build_app(cfg: DictConfig) -> gr.Blocks:
    """The Gradio Blocks app for `cfg` (configs/app.yaml); `launch_app` serves it. The
    model's labels are asked from the server on every page load, never fixed here."""
    labels = starting_labels(cfg)
    ctx = app_context(cfg, labels)
    with gr.Blocks(title=str(cfg.title), analytics_enabled=False) as app:
        gr.Markdown(f"# {cfg.title}\nEquipment sound → fault class. Server: `{ctx.client.url}`")
        labels_line = gr.Markdown(elem_id="model-labels")
        with gr.Tabs():
            with gr.Tab("Predict", id="predict"):
                predict_tab(ctx, labels)
            with gr.Tab("Upload", id="upload"):
                counts_table, label_choice = upload_tab(ctx, labels)
            with gr.Tab("Retrain", id="retrain"):
                retrain_tab(ctx, cfg.retrain.get("default_epochs") or 0)
            with gr.Tab("Models", id="models"):
                models_outputs = models_tab(ctx)
            with gr.Tab("Insights", id="insights"):
                insights_outputs, example_texts, example_rows = insights_tab(ctx)
            with gr.Tab("Monitor", id="monitor"):
                monitor_outputs = monitor_tab(ctx)
                queue_outputs = label_queue_part(ctx)
        app.load(
            partial(handlers.on_load, ctx),
            None,
            [*models_outputs, counts_table, labels_line, label_choice],
            api_visibility="private",
        )
        # Separate, so the slower Insights figures never hold up the other tabs.
        app.load(
            partial(handlers.insights, ctx, toast=False),
            None,
            insights_outputs,
            api_visibility="private",
        ).then(handlers.shown_slots, example_texts, example_rows, api_visibility="private")
        app.load(
            partial(handlers.monitor, ctx, toast=False),
            None,
            monitor_outputs,
            api_visibility="private",
        )
        app.load(
            partial(handlers.label_queue, ctx, toast=False),
            None,
            queue_outputs,
            api_visibility="private",
        )
    return app


def app_auth(auth: Any) -> tuple[str, str] | None:
    """Gradio's login from `auth:` in app.yaml: on only when both user and password are set."""
    if auth.get("username") and auth.get("password"):
        return str(auth.username), str(auth.password)
    if auth.get("username") or auth.get("password"):
        log.warning(
            "app auth needs both FAULTSENSE_APP_USER and FAULTSENSE_APP_PASSWORD; auth is off"
        )
    return None


def launch_app(cfg: DictConfig, *, block: bool = True) -> gr.Blocks:
    """Build and serve the app on cfg.host:cfg.port; never opens a share link."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per server call is noise
    app = build_app(cfg)
    app.queue(default_concurrency_limit=int(cfg.concurrency_limit))
    app.launch(
        server_name=str(cfg.host),
        server_port=int(cfg.port),
        share=False,
        ssr_mode=False,
        auth=app_auth(cfg.auth),
        max_file_size=cfg.get("max_file_size"),
        prevent_thread_lock=not block,
        show_error=False,
        footer_links=["api", "settings"],
        theme=gr.themes.Default(),
    )
    return app


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="app")
def main(cfg: DictConfig) -> None:
    run_cli("faultsense-app", launch_app, cfg)


if __name__ == "__main__":
    main()

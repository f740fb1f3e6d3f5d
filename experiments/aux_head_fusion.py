"""Would serving the auxiliary ESC-50 category head help? Scores, per CV fold, the val
macro F1 of the fault head, of the category head's probabilities summed per fault label,
and of their mean, from the best checkpoint of each fold's run.

    uv run --frozen python experiments/aux_head_fusion.py logs/cv/<dir> \
        --source ../shared/datasets/esc50-16k

`<dir>` holds one run folder per fold (a `faultsense-cv` multirun or `f1..f4`), each
with `checkpoints/epoch_*.ckpt` and `.hydra/overrides.yaml` or `metrics.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torchmetrics.functional.classification import multiclass_f1_score

from faultsense import CONFIG_DIR
from faultsense.data.datamodule import FaultDataModule, prepared_datamodule
from faultsense.models.classifier import FaultClassifier


def compose_for_eval(source: str, fold: int, overrides: list[str]) -> FaultDataModule:
    """The run's datamodule: its data.* overrides, then this source and its val fold."""
    from hydra import compose, initialize_config_dir

    data = [o for o in overrides if o.startswith("data.") and not o.startswith("data.source")]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            [*data, f"data.source={source}", f"data.val_fold={fold}", "data.progress=false"],
        )
    return prepared_datamodule(cfg.data)


def fold_scores(run: Path, source: str) -> tuple[int, list[float]]:
    summary = json.loads((run / "metrics.json").read_text())
    fold = int(summary["val_fold"])
    ckpt = next(p for p in sorted((run / "checkpoints").glob("epoch_*.ckpt")))
    model = FaultClassifier.load_from_checkpoint(ckpt, weights_only=True).eval()
    if model.aux_head is None:
        raise SystemExit(f"{ckpt} has no auxiliary category head (model.aux_weight=0).")
    dm = compose_for_eval(source, fold, summary.get("overrides", []))
    to_label = torch.zeros(len(dm.categories), len(dm.labels))
    for label, categories in dm.mapping["classes"].items():
        for category in categories:
            to_label[dm.categories.index(category), dm.labels.index(label)] = 1.0
    targets, fault, summed = [], [], []
    with torch.inference_mode():
        for wave, label, _ in dm.val_dataloader():
            embedding = model.net.embed(wave)
            fault.append(model.net.head(embedding).softmax(1))
            p = model.aux_head(embedding).softmax(1) @ to_label
            summed.append(p / p.sum(1, keepdim=True))
            targets.append(label)
    y, a, b = torch.cat(targets), torch.cat(fault), torch.cat(summed)
    n = len(dm.labels)
    return fold, [
        float(multiclass_f1_score(p.argmax(1), y, n, average="macro")) for p in (a, b, (a + b) / 2)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--source", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = sorted(fold_scores(p.parent, args.source) for p in args.runs.rglob("metrics.json"))
    print("fold | fault head | category head summed | mean of both")
    for fold, scores in rows:
        print(f"{fold} | " + " | ".join(f"{s:.3f}" for s in scores))
    means = [sum(r[1][i] for r in rows) / len(rows) for i in range(3)]
    print("mean | " + " | ".join(f"{s:.3f}" for s in means))


if __name__ == "__main__":
    main()

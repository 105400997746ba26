"""evaluate.py's results mirrored to TensorBoard and/or Weights & Biases, as training mirrors metrics.jsonl
(minigpt4/runners/metrics.py): `eval.tensorboard: true` writes {output_dir}/tensorboard, `eval.wandb: true` a W&B
run in {output_dir}/wandb, offline unless WANDB_MODE says otherwise (`wandb sync` uploads it later).

What is logged, once per evaluation, at step 0:
  * every metric as a scalar: eval/chair/chair_s, ..., eval/pope/<split>/<metric>, eval/pope/mean/<metric>;
  * the per-item outputs as a table: eval/chair_captions (image, caption, objects named, hallucinated ones) and
    eval/pope_answers (split, image, question, truth, the model's answer as labelled). TensorBoard shows tables as
    Markdown text (the Text tab), W&B as a `wandb.Table`.
metrics.json, chair.json and pope.json stay the record; these are views of them.
"""
from __future__ import annotations

import html
import os
from typing import Any, Iterable

from minigpt4.common.config import ConfigError

CHAIR_COLUMNS = ("image_id", "caption", "mentions", "hallucinated")
POPE_COLUMNS = ("split", "question_id", "image", "question", "label", "answer_label")


def check_backends(tensorboard: bool, wandb: bool) -> None:
    """Before the model is built: a requested backend whose package is missing is a config error."""
    for wanted, module, key in ((tensorboard, "tensorboard", "eval.tensorboard"), (wandb, "wandb", "eval.wandb")):
        if not wanted:
            continue
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(f"{key} is true but the `{module}` package is missing: pip install {module} "
                              f"(or set {key}: false)") from None


def scalar_metrics(results: dict) -> dict[str, float]:
    """Every number of metrics.json's chair and pope results, as flat `eval/...` tags."""
    scalars: dict[str, float] = {}
    chair = results.get("chair") or {}
    for key in ("chair_s", "chair_i", "recall", "mean_length", "n_captions", "n_mentions"):
        if isinstance(chair.get(key), (int, float)):
            scalars[f"eval/chair/{key}"] = float(chair[key])
    pope = results.get("pope") or {}
    groups = dict(pope.get("splits") or {})
    if isinstance(pope.get("mean"), dict):
        groups["mean"] = pope["mean"]
    for split, metrics in groups.items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                scalars[f"eval/pope/{split}/{key}"] = float(value)
    return scalars


def chair_rows(chair: dict) -> list[list[Any]]:
    return [[row.get("image_id"), row.get("caption", ""), ", ".join(row.get("mentions", [])),
             ", ".join(row.get("hallucinated", []))] for row in chair.get("per_caption", [])]


def pope_rows(pope: dict) -> list[list[Any]]:
    """One row per POPE question, read back from the question and answer files the result names."""
    if not pope.get("files"):
        return []
    from minigpt4.eval.pope import answered_questions

    return [[split, q.get("question_id"), q.get("image"), q.get("text"), q.get("label"), predicted]
            for split, q, predicted in answered_questions(pope)]


def markdown_table(columns: Iterable[str], rows: list[list[Any]]) -> str:
    """Rows as a Markdown table for TensorBoard's Text tab (cells escaped so no caption breaks the table)."""
    def cell(value: Any) -> str:
        return html.escape(str(value)).replace("|", "&#124;").replace("\n", " ")

    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def log_evaluation(out_dir: str, results: dict, *, tensorboard: bool, wandb: bool,
                   wandb_project: str = "minigpt4-adavib", config: dict | None = None) -> None:
    """Write `results` (evaluate.py's, with pope and chair) to the requested backends."""
    scalars = scalar_metrics(results)
    tables = {"eval/chair_captions": (CHAIR_COLUMNS, chair_rows(results.get("chair") or {})),
              "eval/pope_answers": (POPE_COLUMNS, pope_rows(results.get("pope") or {}))}
    tables = {name: table for name, table in tables.items() if table[1]}
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=os.path.join(out_dir, "tensorboard")) as writer:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, 0)
            for tag, (columns, rows) in tables.items():
                writer.add_text(tag, markdown_table(columns, rows), 0)
            if results.get("protocol"):
                writer.add_text("eval/protocol", str(results["protocol"]), 0)
    if wandb:
        import wandb as wandb_module

        run = wandb_module.init(project=wandb_project, name=results.get("model"), config=config, dir=out_dir,
                                job_type="eval", mode=os.environ.get("WANDB_MODE", "offline"))
        try:
            run.log(scalars, step=0)
            run.log({tag: wandb_module.Table(columns=list(columns), data=rows)
                     for tag, (columns, rows) in tables.items()}, step=0)
            run.summary["protocol"] = results.get("protocol")
        finally:
            run.finish()

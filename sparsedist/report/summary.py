"""summary.json: what a finished run achieved, computed from its metrics.jsonl epoch records."""

from __future__ import annotations

from collections import Counter
from typing import Any

from sparsedist.config import regime_key


def summarize(records: list[dict[str, Any]], *, select_keep_ratio: float) -> dict[str, Any]:
    """Final and selected per-regime accuracy, best-test (paper comparison), keep ratios, speed.

    `selected` is the epoch with the best selection accuracy at `select_keep_ratio` (the checkpoint in
    best/): under eval.selection heldout the validation accuracy, and its test accuracy is the run's
    result; under paper the test accuracy itself (the released script's best-on-test), labelled so.
    `test_best_per_regime` maximizes over epochs on the test set per regime, which is optimistic; it is
    reported only to compare with the paper's numbers.
    """
    epochs = [r for r in records if r["kind"] == "epoch"]
    if not epochs:
        raise ValueError("no epoch records: the run has not completed an epoch")
    evaluated = [r for r in epochs if r["eval"]]
    final = evaluated[-1]
    best = [r for r in epochs if r["is_best"]]
    selected = best[-1] if best else None
    selected_on = "test" if final.get("selection") == "paper" else "validation"
    train_time = sum(r["epoch_time_s"] for r in epochs)
    images = sum(r["images_per_sec"] * r["epoch_time_s"] for r in epochs)
    return {
        "epochs_completed": epochs[-1]["epoch"] + 1,
        "steps": epochs[-1]["step"],
        "final": {
            "epoch": final["epoch"], "val": final["eval"].get("val"), "test": final["eval"]["test"],
            "keep_ratio": final["keep_ratio"], "realized_keep": final["realized_keep"],
            "calibrated_keep": {key: c["realized_keep"] for key, c in final["calibration"].items()},
            "at_training_keep": final.get("eval_current") or None,  # the rho training ended at
        },
        "selected": None if selected is None else {
            "epoch": selected["epoch"],
            "selected_by": f"{selected_on} accuracy at keep ratio {regime_key(select_keep_ratio)}"
                           + (" (paper protocol: best-on-test, optimistic)" if selected_on == "test" else ""),
            "selection": final.get("selection", "heldout"),
            "val": selected["eval"].get("val"), "test": selected["eval"]["test"],
        },
        "test_best_per_regime": {
            key: max(r["eval"]["test"][key] for r in evaluated) for key in final["eval"]["test"]
        },
        "keep_ratio": {
            "final": epochs[-1]["keep_ratio"],
            "realized_final": epochs[-1]["realized_keep"],
            "realized_mean": sum(r["realized_keep"] for r in epochs) / len(epochs),
        },
        "controller_events": dict(sum((Counter(r["events"]) for r in epochs), Counter())),
        # 1-based epochs whose training accuracy stayed at chance (after the first): the run was not learning.
        "not_learning_epochs": [r["epoch"] + 1 for r in epochs if r.get("at_chance")],
        "train_time_s": train_time,
        "images_per_sec": images / train_time if train_time > 0 else 0.0,
    }


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's accuracies as flat TensorBoard hparams metrics (tags unused by the training curves)."""
    metrics = {f"summary/final_test/keep_{k}": v for k, v in summary["final"]["test"].items()}
    if summary["selected"] is not None:
        metrics.update({f"summary/selected_test/keep_{k}": v for k, v in summary["selected"]["test"].items()})
    return metrics


def regime_table(summary: dict[str, Any]) -> str:
    """Per-regime accuracy as a text table: final epoch, the validation-selected epoch, best test."""
    selected = summary["selected"]
    final_val = summary["final"]["val"] or {}
    header = ["keep", "final val", "final test"]
    if selected is not None:
        on_test = selected.get("selection") == "paper"
        header += [f"{'best-on-test' if on_test else 'selected test'} (epoch {selected['epoch'] + 1})"]
    header += ["best test*"]
    rows = []
    for key, test in sorted(summary["final"]["test"].items(), key=lambda item: -float(item[0])):
        row = [key, f"{final_val[key]:.4f}" if key in final_val else "-", f"{test:.4f}"]
        if selected is not None:
            row.append(f"{selected['test'][key]:.4f}")
        row.append(f"{summary['test_best_per_regime'][key]:.4f}")
        rows.append(row)
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append("* best over epochs on the test set itself: for comparison with the paper only")
    current = summary["final"].get("at_training_keep")
    if current:
        val = f", val {current['val']:.4f}" if current.get("val") is not None else ""
        lines.append(f"at the keep ratio training ended at ({current['keep_ratio']:.4f}): test {current['test']:.4f}{val}")
    if summary.get("not_learning_epochs"):
        lines.append(f"WARNING: not learning: training accuracy was at chance in epochs "
                     f"{', '.join(map(str, summary['not_learning_epochs']))}")
    return "\n".join(lines)

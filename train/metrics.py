"""Predictions and the annotation metrics (scikit-learn's: accuracy, macro-F1, per-class F1, confusions)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator

from train.data import make_loader


def predict(accelerator: Accelerator, model: torch.nn.Module, dataset, collate_fn: Callable, batch_size: int,
            num_workers: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits of every cell (in dataset order) and the labels when the dataset has them, gathered over processes."""
    outputs = predict_outputs(accelerator, model, dataset, collate_fn, batch_size, num_workers)
    return outputs["logits"], outputs["labels"]


@torch.inference_mode()
def predict_outputs(accelerator: Accelerator, model: torch.nn.Module, dataset, collate_fn: Callable, batch_size: int,
                    num_workers: int = 0) -> dict[str, np.ndarray | None]:
    """``logits``, ``labels`` (None without) and ``embeddings`` (the pooled cell vectors the head reads; None for a
    head that returns none, scBERT v1's) of every cell in dataset order, gathered over processes."""
    loader = accelerator.prepare(make_loader(dataset, collate_fn, batch_size, False, 0, num_workers))
    model.eval()
    collected = {"logits": [], "labels": [], "embeddings": []}
    for batch in loader:
        labels = batch.pop("labels", None)
        outputs = model(**batch)
        pooled = getattr(outputs, "pooled_output", None)
        for key, value in (("logits", outputs.logits), ("labels", labels), ("embeddings", pooled)):
            if value is not None:
                value = accelerator.gather_for_metrics(value)
                collected[key].append(value.cpu() if key == "labels" else value.float().cpu())
    return {key: (torch.cat(values).numpy() if values else None) for key, values in collected.items()}


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, names: list[str] | None = None) -> dict:
    """Accuracy and macro-F1 (plus, with ``names``, each class's F1 and the misclassified cells counted as
    "true -> predicted"): the project's one implementation (evaluate.load needs the Hub)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    metrics = {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
    }
    if names is not None:
        # Over every class, present here or not, so per-class numbers line up across folds.
        per_class = f1_score(labels, predictions, labels=np.arange(len(names)), average=None, zero_division=0)
        metrics["per_class_f1"] = {name: float(f1) for name, f1 in zip(names, per_class)}
        confusion = confusion_matrix(labels, predictions, labels=np.arange(len(names)))
        np.fill_diagonal(confusion, 0)
        metrics["errors"] = {f"{names[t]} -> {names[p]}": int(confusion[t, p]) for t, p in zip(*confusion.nonzero())}
    return metrics


def validation_metrics(accelerator: Accelerator, model: torch.nn.Module, dataset, collate_fn: Callable,
                       batch_size: int) -> dict[str, float]:
    """Accuracy, macro-F1 and balanced log-loss of a classifier on labelled cells: what early stopping reads."""
    logits, labels = predict(accelerator, model, dataset, collate_fn, batch_size)
    return {**classification_metrics(labels, logits.argmax(-1)), "balanced_log_loss": balanced_log_loss(labels, logits)}


def balanced_log_loss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Cross-entropy averaged within each class present, then over those classes: every class weighs the same, as in
    macro-F1, but a cell counts by how sure the model is of its true type rather than only by whether the argmax hit
    it, so it does not move in steps of one cell when a class has one or two cells to score."""
    log_probabilities = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1)
    losses = -log_probabilities[torch.arange(len(labels)), torch.as_tensor(labels)].numpy()
    return float(np.mean([losses[labels == c].mean() for c in np.unique(labels)]))


@torch.inference_mode()
def masked_expression_metrics(accelerator: Accelerator, model: torch.nn.Module, dataset, collate_fn: Callable,
                              batch_size: int) -> dict[str, float]:
    """Held-out pretraining metrics over the masked tokens: scBERT 2.0's bin accuracy, bin cross-entropy and value
    MSE, or scBERT v1's masked-token accuracy and cross-entropy. ``collate_fn`` should be seeded so the masks are the
    same at every evaluation."""
    loader = accelerator.prepare(make_loader(dataset, collate_fn, batch_size, False, 0, 0))
    model.eval()
    totals = {"tokens": 0.0, "correct": 0.0, "cross_entropy": 0.0, "squared_error": 0.0}
    for batch in loader:
        outputs = model(**batch)
        targets = batch["labels"] != -100
        logits = outputs.bin_logits if hasattr(outputs, "bin_logits") else outputs.logits
        tokens = targets.sum()
        stats = {"tokens": tokens, "correct": ((logits.argmax(-1) == batch["labels"]) & targets).sum()}
        stats["cross_entropy"] = torch.nn.functional.cross_entropy(
            logits[targets].float(), batch["labels"][targets], reduction="sum")
        if getattr(outputs, "value_predictions", None) is not None:
            errors = (outputs.value_predictions.float() - batch["value_labels"].float()) ** 2
            stats["squared_error"] = errors[targets].sum()
        for key, value in stats.items():
            totals[key] += float(accelerator.reduce(torch.as_tensor(value, device=accelerator.device).float(), "sum"))
    tokens = max(totals["tokens"], 1.0)
    metrics = {"masked_accuracy": totals["correct"] / tokens, "masked_cross_entropy": totals["cross_entropy"] / tokens}
    if totals["squared_error"]:
        metrics["masked_value_mse"] = totals["squared_error"] / tokens
    return metrics

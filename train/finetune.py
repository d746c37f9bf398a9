"""Fine-tuning for cell type annotation, for scBERT and scBERT 2.0 alike, with a logistic-regression baseline.

    accelerate launch train/finetune.py --data cells.h5ad --label_key cell_type --model runs/pretrain/model \
        --output_dir runs/annotate

Splits the cells (stratified train/validation/test, or fold K of a stratified k-fold), trains on batches that draw
every cell type equally often (`--class_sampling`) with early stopping on the validation balanced log-loss (or
macro-F1, `--metric_for_best`) of an exponential moving average of the weights (`--ema_decay`, 0.995), evaluates
the best model on the held-out cells and fits, on the same split, L1-regularised logistic regression on the same
log-normalised expression. OUTPUT_DIR/model is the Hub-ready folder;
OUTPUT_DIR/results.json holds both results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from transformers import AutoModelForSequenceClassification

if __package__ in (None, ""):  # `accelerate launch train/finetune.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenization import GeneExpressionTokenizer  # noqa: E402
from train.training import (  # noqa: E402
    ClassificationCollator,
    add_training_arguments,
    architecture_config,
    architecture_mode,
    balanced_log_loss,
    classification_metrics,
    load_pretrained_folder,
    load_tokenized_dataset,
    initialise_gene_embeddings,
    make_accelerator,
    predict,
    read_h5ad,
    save_model_folder,
    select_highly_variable_genes,
    train_loop,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="an .h5ad file with labelled cells")
    parser.add_argument("--label_key", required=True, help="obs column holding the cell types")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a pretrained folder (its tokenizer is used)")
    source.add_argument("--architecture", default="scbert2-small", help="from scratch: a preset or scbert-small")
    parser.add_argument("--gene_key", default=None)
    parser.add_argument("--max_length", type=int, default=512,
                        help="from scratch, scBERT 2.0: tokens per cell at most (the most expressed of the selected "
                             "genes); 512 keeps every expressed highly variable gene of nearly every cell")
    parser.add_argument("--test_size", type=float, default=0.2)
    parser.add_argument("--validation_size", type=float, default=0.1)
    parser.add_argument("--kfold", type=int, default=None, help="use fold --fold of a stratified k-fold as test set")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--class_sampling", choices=["none", "balanced"], default="balanced",
                        help="balanced: every epoch draws each class equally often (with replacement), so a rare "
                             "type's few cells are seen many times, each time with a different --gene_dropout")
    parser.add_argument("--class_weighting", choices=["none", "balanced"], default="none",
                        help="balanced: cross-entropy weighted by inverse class frequency (the alternative to "
                             "--class_sampling balanced; both at once would count the imbalance twice)")
    parser.add_argument("--metric_for_best", choices=["balanced_log_loss", "macro_f1"], default="balanced_log_loss",
                        help="validation metric for early stopping and the model kept. balanced_log_loss (lower is "
                             "better): cross-entropy averaged per class, then over classes; weighs classes like "
                             "macro-F1 but does not jump by one cell's worth when a rare class has one validation cell")
    parser.add_argument("--patience", type=int, default=6, help="epochs without validation improvement")
    parser.add_argument("--logit_adjustment", choices=["none", "validation"], default="validation",
                        help="validation: after training, add tau * log(training class frequency) to the bias of "
                             "the layer that outputs the logits, tau from --logit_adjustment_grid picked on the "
                             "validation macro-F1 (0 is in the grid: no adjustment); class-balanced training scores "
                             "every class as equally common, tau = 1 restores the training cells' frequencies")
    parser.add_argument("--logit_adjustment_grid", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    parser.add_argument("--baseline_C", type=float, nargs="+", default=[0.01, 0.1, 1.0],
                        help="inverse L1 strengths tried for the baseline (picked on the validation cells)")
    parser.add_argument("--no_baseline", action="store_true")
    parser.add_argument("--pooling", choices=["cls", "mean", "mean_max"], default="mean_max",
                        help="scBERT 2.0 cell vector: mean_max keeps a rare type's few marker genes from being "
                             "averaged away")
    parser.add_argument("--gene_dropout", type=float, default=0.3,
                        help="augmentation: share of each training cell's expressed genes dropped per epoch")
    parser.add_argument("--freeze_gene_embeddings", action="store_true",
                        help="scBERT 2.0: keep the gene embedding table fixed (the SVD initialisation or the pretrained "
                             "table) and train the rest: a rare type's few training cells cannot then reshape the "
                             "vectors of its marker genes to memorise those cells")
    add_training_arguments(parser)
    parser.set_defaults(num_epochs=20, learning_rate=2e-3, per_device_batch_size=16, gene_embedding_init="svd_whitened",
                        highly_variable_genes=2000, ema_decay=0.995)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def split_cells(labels: np.ndarray, names: list[str], args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Stratified train/validation/test indices; the validation cells come out of the training share."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    counts = np.bincount(labels, minlength=len(names))
    too_small = {names[i]: int(c) for i, c in enumerate(counts) if c < 2}
    if too_small:
        raise ValueError(
            f"Classes with fewer than 2 cells cannot be split stratified: {too_small}. Remove those cells or merge "
            "the classes first."
        )
    indices = np.arange(len(labels))
    if args.kfold:
        if not 0 <= args.fold < args.kfold:
            raise ValueError(f"--fold must be in [0, {args.kfold}), got {args.fold}.")
        folds = StratifiedKFold(n_splits=args.kfold, shuffle=True, random_state=args.seed)
        train_val, test = list(folds.split(indices, labels))[args.fold]
    else:
        train_val, test = train_test_split(indices, test_size=args.test_size, stratify=labels, random_state=args.seed)
    # A class left with one training cell still needs a validation share: stratify only when every class can.
    stratify = labels[train_val] if np.bincount(labels[train_val]).min(initial=2) >= 2 else None
    train, validation = train_test_split(train_val, test_size=args.validation_size, stratify=stratify,
                                         random_state=args.seed)
    return {"train": np.sort(train), "validation": np.sort(validation), "test": np.sort(test)}


def logistic_regression_baseline(features, labels: np.ndarray, names: list[str], split: dict[str, np.ndarray],
                                  grid: tuple[float, ...]) -> dict:
    """L1-regularised logistic regression (one-vs-rest) on log-normalised expression, the baseline that beats
    scBERT in the literature (Boiarsky et al. 2023). Its strength C is picked on the validation cells, as the model's
    early stopping is, then it is refitted on the training cells and scored on the test cells."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    def fit(C: float):
        classifier = LogisticRegression(l1_ratio=1.0, solver="liblinear", C=C, max_iter=1000)
        return OneVsRestClassifier(classifier).fit(features[split["train"]], labels[split["train"]])

    start = time.perf_counter()
    validation = {C: classification_metrics(labels[split["validation"]], fit(C).predict(features[split["validation"]]))
                  for C in grid}
    best_C = max(grid, key=lambda C: validation[C]["macro_f1"])
    predictions = fit(best_C).predict(features[split["test"]])
    return {**classification_metrics(labels[split["test"]], predictions, names), "C": best_C,
            "validation_macro_f1": {str(C): m["macro_f1"] for C, m in validation.items()},
            "seconds": time.perf_counter() - start}


def choose_logit_adjustment(logits: np.ndarray, labels: np.ndarray, log_prior: np.ndarray,
                            grid: list[float]) -> float:
    """The tau of ``grid`` whose ``logits + tau * log_prior`` score the best macro-F1 (the smallest tau on ties)."""
    taus = sorted(grid)
    scores = [classification_metrics(labels, (logits + tau * log_prior).argmax(-1))["macro_f1"] for tau in taus]
    return taus[int(np.argmax(scores))]


def logits_layer(model) -> torch.nn.Linear:
    """The linear layer whose output is the class logits: scBERT 2.0's classifier, the last layer of scBERT v1's."""
    if model.config.model_type == "scbert2":
        return model.classifier
    return model.classifier.fc3 if model.config.classifier_type == "conv" else model.classifier.out_proj


def weighted_cross_entropy(weights: torch.Tensor, aux_loss_coef: float):
    """Class-weighted cross-entropy plus the MoE load-balancing loss the model would have added itself."""
    def loss_fn(outputs, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(outputs.logits.float(), labels, weight=weights.to(outputs.logits.device))
        aux_loss = getattr(outputs, "aux_loss", None)
        return loss if aux_loss is None else loss + aux_loss_coef * aux_loss
    return loss_fn


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = make_accelerator(args, "finetune")
    set_seed(args.seed)
    adata = read_h5ad(args.data)
    if args.label_key not in adata.obs.columns:
        raise KeyError(f"--label_key {args.label_key!r} is not a column of {args.data}'s obs "
                       f"(columns: {list(adata.obs.columns)}).")
    if args.model:
        base_config, tokenizer = load_pretrained_folder(args.model)
        tokenizer.zero_fraction = 0.0
    else:
        tokenizer = GeneExpressionTokenizer.from_adata(adata, gene_key=args.gene_key,
                                                       mode=architecture_mode(args.architecture),
                                                       max_length=args.max_length)
    with accelerator.main_process_first():
        dataset = load_tokenized_dataset([args.data], tokenizer, label_key=args.label_key, cache_dir=args.cache_dir)
    names = dataset.features["label"].names
    labels = np.asarray(dataset["label"])
    split = split_cells(labels, names, args)
    id2label = dict(enumerate(names))
    label2id = {name: i for i, name in id2label.items()}
    select_highly_variable_genes(tokenizer, dataset.select(split["train"]), args)
    pooling = {"pooling": args.pooling} if tokenizer.mode == "scbert2" else {}  # scBERT v1 has its own head
    if args.model:
        model = AutoModelForSequenceClassification.from_pretrained(
            args.model, num_labels=len(names), id2label=id2label, label2id=label2id, **pooling)
    else:
        config = architecture_config(args.architecture, tokenizer, num_labels=len(names), id2label=id2label,
                                     label2id=label2id, **pooling)
        model = AutoModelForSequenceClassification.from_config(config)
        initialise_gene_embeddings(model, dataset.select(split["train"]), tokenizer, args)
    if args.freeze_gene_embeddings:
        if model.config.model_type != "scbert2":
            raise ValueError("--freeze_gene_embeddings applies to scBERT 2.0 (its gene table); scBERT v1 has none.")
        model.get_input_embeddings().weight.requires_grad_(False)
    if min(args.logit_adjustment_grid) < 0:
        raise ValueError(f"--logit_adjustment_grid takes values >= 0 (0: no adjustment), got {args.logit_adjustment_grid}.")

    train_labels = labels[split["train"]]
    counts = np.bincount(train_labels, minlength=len(names)).astype(np.float64)
    loss_fn = None
    if args.class_weighting == "balanced":
        weights = len(split["train"]) / (len(names) * np.maximum(counts, 1))
        loss_fn = weighted_cross_entropy(torch.tensor(weights, dtype=torch.float32),
                                         getattr(model.config, "router_aux_loss_coef", 0.0))

    sample_weights = 1.0 / counts[train_labels] if args.class_sampling == "balanced" else None

    collate = ClassificationCollator(tokenizer)
    train_collate = ClassificationCollator(tokenizer, gene_dropout=args.gene_dropout, seed=args.seed)
    output = Path(args.output_dir) / "model"

    def evaluate(model) -> dict[str, float]:
        logits, y = predict(accelerator, model, dataset.select(split["validation"]), collate, args.per_device_batch_size)
        return {**classification_metrics(y, logits.argmax(-1)), "balanced_log_loss": balanced_log_loss(y, logits)}

    def keep_best(unwrapped) -> None:
        save_model_folder(unwrapped, tokenizer, output, accelerator)

    result = train_loop(accelerator, model, dataset.select(split["train"]), train_collate, args, evaluate=evaluate,
                        metric_for_best=args.metric_for_best, greater_is_better=args.metric_for_best == "macro_f1",
                        patience=args.patience, on_new_best=keep_best, loss_fn=loss_fn,
                        sample_weights=sample_weights)
    best = accelerator.prepare(AutoModelForSequenceClassification.from_pretrained(output))
    tau = None
    if args.logit_adjustment == "validation":
        log_prior = np.log(np.maximum(counts, 1) / counts.sum())
        validation_logits, validation_labels = predict(accelerator, best, dataset.select(split["validation"]), collate,
                                                       args.per_device_batch_size)
        tau = choose_logit_adjustment(validation_logits, validation_labels, log_prior, args.logit_adjustment_grid)
        bias = logits_layer(accelerator.unwrap_model(best)).bias
        with torch.no_grad():
            bias += torch.as_tensor(tau * log_prior, dtype=bias.dtype)
        save_model_folder(best, tokenizer, output, accelerator)
    logits, y = predict(accelerator, best, dataset.select(split["test"]), collate, args.per_device_batch_size)
    results = {
        "data": str(args.data),
        "label_key": args.label_key,
        "model_type": model.config.model_type,
        "pretrained_from": args.model,
        "split": {k: int(len(v)) for k, v in split.items()} | ({"kfold": args.kfold, "fold": args.fold} if args.kfold else {}),
        "num_classes": len(names),
        "model": {**classification_metrics(y, logits.argmax(-1), names), "train_seconds": result.seconds,
                  "steps": result.step, f"best_validation_{args.metric_for_best}": result.best_metric}
                 | ({"logit_adjustment_tau": tau} if tau is not None else {}),
    }
    if not args.no_baseline and accelerator.is_main_process:
        features = tokenizer.encode_matrix(adata, gene_key=args.gene_key)
        results["baseline_logistic_regression_l1"] = logistic_regression_baseline(features, labels, names, split,
                                                                                   tuple(args.baseline_C))
    if accelerator.is_main_process:
        (Path(args.output_dir) / "results.json").write_text(json.dumps(results, indent=2))
        print_results(results)
    accelerator.end_training()
    return results


def print_results(results: dict) -> None:
    rows = [("scBERT family model (" + results["model_type"] + ")", results["model"])]
    if "baseline_logistic_regression_l1" in results:
        rows.append(("logistic regression (L1), same split", results["baseline_logistic_regression_l1"]))
    print(f"\n{'held-out cells: ' + str(results['split']['test']):<42} {'accuracy':>9} {'macro-F1':>9}")
    for name, metrics in rows:
        print(f"{name:<42} {metrics['accuracy']:>9.4f} {metrics['macro_f1']:>9.4f}")


if __name__ == "__main__":
    main()

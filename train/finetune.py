"""Fine-tuning for cell type annotation, for scBERT and scBERT 2.0 alike, with a logistic-regression baseline.

    scbert finetune --data cells.h5ad --label_key cell_type --model runs/pretrain/model --output_dir runs/annotate
    accelerate launch -m train.finetune ...                       # the same, on several GPUs / processes

Splits the cells (stratified train/validation/test, or fold K of a stratified k-fold), trains on batches that draw
every cell type equally often (`--class_sampling`) with early stopping on the validation balanced log-loss (or
macro-F1, `--metric_for_best`) of an exponential moving average of the weights (`--ema_decay`, 0.995), evaluates
the best model on the held-out cells and fits, on the same split, L1-regularised logistic regression on the same
log-normalised expression. OUTPUT_DIR/model is the Hub-ready folder;
OUTPUT_DIR/results.json holds both results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from transformers import AutoConfig, AutoModelForSequenceClassification

from tokenization import GeneExpressionTokenizer
from train.cli import run_command
from train.data import ClassificationCollator, load_tokenized_dataset, make_loader, read_h5ad, training_fingerprint
from train.genes import add_data_genes, initialise_gene_embeddings, select_highly_variable_genes
from train.loop import EarlyStopping, add_training_arguments, make_accelerator, model_loss, run_identity, train_loop
from train.metrics import classification_metrics, predict, predict_outputs, validation_metrics
from train.novelty import (detector_score_names, fit_novelty_detector, flag_novel, model_expression_genes,
                           novelty_scores, save_statistics)
from train.models import (
    architecture_config,
    architecture_mode,
    attention_kwargs,
    load_pretrained_folder,
    save_model_folder,
    tokenizer_overrides,
)

# The fine-tuning recipe, each part measured by a 5-fold CV on Baron (benchmarks/results/annotation/README.md).
# Benchmarks read them from here, so they cannot drift from what `scbert finetune` does.
DEFAULTS = {"num_epochs": 20, "learning_rate": 2e-3, "per_device_batch_size": 16, "gene_embedding_init": "svd_whitened",
            "highly_variable_genes": 2000, "ema_decay": 0.995, "max_length": 512}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scbert finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="an .h5ad file with labelled cells")
    parser.add_argument("--label_key", required=True, help="obs column holding the cell types")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a pretrained folder (its tokenizer is used)")
    source.add_argument("--architecture", default="scbert2-small", help="from scratch: a preset or scbert-small")
    parser.add_argument("--from_scratch", action="store_true",
                        help="with --model: that folder's architecture and tokenizer (its genes), freshly initialised "
                             "weights: what the pretraining is worth, on the same inputs")
    parser.add_argument("--gene_key", default=None)
    parser.add_argument("--max_length", type=int,
                        help="scBERT 2.0: tokens per cell at most (the most expressed of the selected genes), from "
                             "scratch or in place of --model's saved value; 512 keeps every expressed highly variable "
                             "gene of nearly every cell, fewer annotate faster")
    parser.add_argument("--test_size", type=float, default=0.2)
    parser.add_argument("--validation_size", type=float, default=0.1)
    parser.add_argument("--kfold", type=int, default=None, help="use fold --fold of a stratified k-fold as test set")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--labelled_per_class", type=int, default=None,
                        help="few-shot: K randomly drawn cells per type (at most half of a type's cells) are the "
                             "labelled training cells, every other cell is a test cell. Too few cells to spare for "
                             "validation: the training cells stand in for it (early stopping, tau, the baseline's C), "
                             "and the unsupervised choices (highly variable genes, SVD gene table) use all cells, "
                             "whose labels are never read. Runs of a few hundred steps want --ema_decay 0 (the "
                             "0.995 average lags by about 200 steps)")
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
    parser.add_argument("--novelty_false_flag_rate", type=float, default=0.02,
                        help="the novelty detector's thresholds flag this share of the validation cells (all of "
                             "known types); a lower rate flags fewer known cells and fewer novel ones")
    parser.add_argument("--baseline_C", type=float, nargs="+", default=[0.01, 0.1, 1.0],
                        help="inverse L1 strengths tried for the baseline (picked on the validation cells)")
    parser.add_argument("--no_baseline", action="store_true")
    parser.add_argument("--pooling", choices=["cls", "mean", "mean_max"], default="mean_max",
                        help="scBERT 2.0 cell vector: mean_max keeps a rare type's few marker genes from being "
                             "averaged away")
    parser.add_argument("--expression_pooling", action=argparse.BooleanOptionalAction, default=None,
                        help="scBERT 2.0 (on unless --no-expression_pooling): the classifier also reads each cell's "
                             "expression through the gene table (with the SVD table, its principal components), "
                             "beside the encoder's pooled states; pbmc68k_reduced 5-fold CV: macro-F1 0.632 with it, "
                             "0.560 without (logistic regression 0.621)")
    parser.add_argument("--gene_dropout", type=float, default=0.3,
                        help="augmentation: share of each training cell's expressed genes dropped per epoch")
    parser.add_argument("--gene_table", choices=["aligned", "data", "pretrained"], default=None,
                        help="with --model: the gene embedding table under the pretrained encoder layers (default: "
                             "aligned for scBERT 2.0, data for scBERT v1's positional table). aligned: "
                             "this data's SVD table (--gene_embedding_init, as from scratch) turned onto the "
                             "pretrained table's axes, which the layers were trained on; data: the SVD table as it "
                             "comes; pretrained: keep the checkpoint's table (the small corpus leaves the vectors of "
                             "genes it rarely saw, e.g. pancreas markers, untrained). Baron, 10 labelled cells per "
                             "type, first draw: macro-F1 0.932 aligned, 0.868 data (from scratch 0.922); Baron, every "
                             "label (5-fold CV): 0.929 aligned, 0.969 data")
    parser.add_argument("--add_data_genes", action=argparse.BooleanOptionalAction, default=None,
                        help="fine-tuning a pretrained scBERT 2.0 --model (on unless --no-add_data_genes or "
                             "--from_scratch): append the data's genes that the pretrained vocabulary lacks "
                             "(expressed in >= 3 cells; e.g. mouse genes without a one-to-one human ortholog) to the "
                             "vocabulary, their vectors from the data's SVD, so the classifier reads every gene a "
                             "model from scratch reads. Baron (2,487 genes added), 25 labelled cells per type, 4 "
                             "draws: macro-F1 0.942 with it, 0.912 without (from scratch 0.952)")
    parser.add_argument("--freeze_gene_embeddings", action="store_true",
                        help="scBERT 2.0: keep the gene embedding table fixed (the SVD initialisation or the pretrained "
                             "table) and train the rest: a rare type's few training cells cannot then reshape the "
                             "vectors of its marker genes to memorise those cells")
    parser.add_argument("--encoder_learning_rate_scale", type=float, default=1.0,
                        help="with --model: the pretrained encoder (every weight of the base model but the gene "
                             "table) trains at this multiple of --learning_rate, the gene table and the new head at "
                             "--learning_rate, so few labelled cells move the pretrained layers less; 0 keeps them "
                             "fixed (a probe of the pretrained layers)")
    add_training_arguments(parser)
    parser.set_defaults(**DEFAULTS)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_labels(names: list[str], label_key: str) -> None:
    if len(names) < 2:
        raise ValueError(f"The label column {label_key!r} holds a single class ({names}): a classifier needs at least "
                         "two cell types to tell apart. Pass another --label_key or data with more types.")


def split_cells(labels: np.ndarray, names: list[str], args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Stratified train/validation/test indices; the validation cells come out of the training share. Refuses a
    split that leaves a class without training cells (the model could never predict it)."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    counts = np.bincount(labels, minlength=len(names))
    too_small = {names[i]: int(c) for i, c in enumerate(counts) if c < 2}
    if too_small:
        raise ValueError(
            f"Classes with fewer than 2 cells cannot be split stratified: {too_small}. Remove those cells or merge "
            "the classes first."
        )
    indices = np.arange(len(labels))
    if args.labelled_per_class is not None:
        return few_shot_split(labels, args.labelled_per_class, args.seed)
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
    missing = [names[i] for i, c in enumerate(np.bincount(labels[train], minlength=len(names))) if c == 0]
    if missing:
        raise ValueError(f"The split leaves no training cell for {missing} (cells per class: "
                         f"{dict(zip(names, counts.tolist()))}). Give those classes more cells, merge or remove them, "
                         "or lower --test_size / --validation_size.")
    return {"train": np.sort(train), "validation": np.sort(validation), "test": np.sort(test)}


def few_shot_split(labels: np.ndarray, per_class: int, seed: int) -> dict[str, np.ndarray]:
    """``per_class`` random cells of each type (at most half of its cells) for training (and, standing in, for
    validation); every other cell for testing."""
    if per_class < 1:
        raise ValueError(f"--labelled_per_class must be >= 1, got {per_class}.")
    rng = np.random.default_rng(seed)
    train = np.concatenate([rng.choice(np.flatnonzero(labels == c), min(per_class, int((labels == c).sum()) // 2),
                                       replace=False) for c in np.unique(labels)])
    train = np.sort(train)
    return {"train": train, "validation": train, "test": np.setdiff1d(np.arange(len(labels)), train)}


def logistic_regression_baseline(features, labels: np.ndarray, names: list[str], split: dict[str, np.ndarray],
                                  grid: tuple[float, ...], **solver_options) -> dict:
    """L1-regularised logistic regression (one-vs-rest) on log-normalised expression, the baseline that beats
    scBERT in the literature (Boiarsky et al. 2023). Its strength C is picked on the validation cells, as the model's
    early stopping is, then it is refitted on the training cells and scored on the test cells. ``solver_options``
    (e.g. ``tol``, ``random_state``) go to scikit-learn's ``LogisticRegression``; benchmarks/baseline_convergence.py
    measures what its defaults leave to liblinear's shuffle."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    def fit(C: float):
        classifier = LogisticRegression(l1_ratio=1.0, solver="liblinear", C=C, **({"max_iter": 1000} | solver_options))
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


def weighted_cross_entropy(weights: torch.Tensor):
    """A ``compute_loss`` hook: class-weighted cross-entropy plus the MoE load-balancing loss the model would have
    added itself."""
    def compute_loss(model, batch):
        labels = batch.pop("labels")
        outputs = model(**batch)
        loss = F.cross_entropy(outputs.logits.float(), labels, weight=weights.to(outputs.logits.device))
        aux_loss = getattr(outputs, "aux_loss", None)
        if aux_loss is not None:
            loss = loss + model.config.router_aux_loss_coef * aux_loss
        return loss, outputs
    return compute_loss


def load_labelled_cells(args: argparse.Namespace, accelerator):
    """The AnnData, the tokenizer (the pretrained folder's or a new one) and the tokenized labelled cells."""
    adata = read_h5ad(args.data)
    if args.label_key not in adata.obs.columns:
        raise KeyError(f"--label_key {args.label_key!r} is not a column of {args.data}'s obs "
                       f"(columns: {list(adata.obs.columns)}).")
    if args.model:
        config, tokenizer = load_pretrained_folder(args.model, **tokenizer_overrides(args))
        if config.model_type == "scbert2":  # v1 reads every gene of its panel
            tokenizer.max_length = args.max_length
        if args.add_data_genes is None:  # the user's genes beyond the checkpoint's are the user's signal
            args.add_data_genes = config.model_type == "scbert2" and not args.from_scratch
        if args.add_data_genes:
            added = add_data_genes(tokenizer, adata, args.gene_key)
            accelerator.print(f"--add_data_genes: {added:,} of the data's genes added to the vocabulary "
                              f"({tokenizer.num_genes:,} genes now)")
    else:
        tokenizer = GeneExpressionTokenizer.from_adata(adata, gene_key=args.gene_key,
                                                       mode=architecture_mode(args.architecture),
                                                       max_length=args.max_length, **tokenizer_overrides(args))
    with accelerator.main_process_first():
        dataset = load_tokenized_dataset([args.data], tokenizer, label_key=args.label_key, cache_dir=args.cache_dir)
    return adata, tokenizer, dataset


def build_classifier(args: argparse.Namespace, tokenizer: GeneExpressionTokenizer, names: list[str], train_cells):
    """The model to fine-tune: the pretrained folder with a new head, or a fresh preset (gene table from the SVD of
    the training cells)."""
    id2label = dict(enumerate(names))
    labels = {"num_labels": len(names), "id2label": id2label, "label2id": {name: i for i, name in id2label.items()}}
    if args.expression_pooling and tokenizer.mode != "scbert2":
        raise ValueError("--expression_pooling reads the gene table of scBERT 2.0; scBERT v1 has none. Drop the flag "
                         "or fine-tune a scBERT 2.0 model.")
    pooling = ({"pooling": args.pooling, "expression_pooling": args.expression_pooling is not False}
               if tokenizer.mode == "scbert2" else {})  # scBERT v1 has its own head
    attention = attention_kwargs(tokenizer.mode, args.attn_implementation)
    if args.model:
        # A new head: an adjustment recorded by an earlier fine-tuning belongs to that head's classes.
        labels.update(class_prior=None, logit_adjustment_tau=0.0)
    if args.gene_table == "aligned" and tokenizer.mode != "scbert2":
        raise ValueError("--gene_table aligned turns the SVD table onto scBERT 2.0's pretrained gene table; scBERT v1 "
                         "has none. Use --gene_table data or pretrained.")
    gene_table = args.gene_table or ("aligned" if tokenizer.mode == "scbert2" else "data")
    if args.model and not args.from_scratch:
        model = AutoModelForSequenceClassification.from_pretrained(args.model, **labels, **pooling, **attention)
        pretrained_genes = None  # every gene of the vocabulary has a pretrained vector
        if args.add_data_genes:  # scBERT 2.0 only (checked on loading): v1's vocab_size counts expression bins
            pretrained_genes = model.config.vocab_size - tokenizer.num_special_tokens
            model.resize_token_embeddings(len(tokenizer))
        if gene_table in ("data", "aligned"):
            initialise_gene_embeddings(model, train_cells, tokenizer, args, align=gene_table == "aligned",
                                       pretrained_genes=pretrained_genes)
    else:
        grown = {"vocab_size": len(tokenizer)} if args.add_data_genes else {}
        config = (AutoConfig.from_pretrained(args.model, **labels, **pooling, **grown) if args.model
                  else architecture_config(args.architecture, tokenizer, **labels, **pooling))
        model = AutoModelForSequenceClassification.from_config(config, **attention)
        initialise_gene_embeddings(model, train_cells, tokenizer, args)
    if args.freeze_gene_embeddings:
        if model.config.model_type != "scbert2":
            raise ValueError("--freeze_gene_embeddings applies to scBERT 2.0 (its gene table); scBERT v1 has none.")
        model.get_input_embeddings().weight.requires_grad_(False)
    return model


def encoder_learning_rate_scales(model: torch.nn.Module, scale: float) -> dict[str, float]:
    """``scale`` for every parameter of the pretrained base model except scBERT 2.0's gene table (which fine-tuning
    builds from the data; scBERT v1's gene table is its frozen positional table), keyed by name as `build_optimizer`
    reads them."""
    gene_table = model.get_input_embeddings().weight if model.config.model_type == "scbert2" else None
    encoder = {id(parameter) for parameter in model.base_model.parameters() if parameter is not gene_table}
    return {name: scale for name, parameter in model.named_parameters() if id(parameter) in encoder}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_scratch and not args.model:
        raise ValueError("--from_scratch takes the architecture and genes of a --model folder; without a folder, "
                         "--architecture already trains from scratch.")
    if args.encoder_learning_rate_scale != 1.0 and (not args.model or args.from_scratch):
        raise ValueError("--encoder_learning_rate_scale slows the pretrained encoder layers of a --model folder; "
                         "from scratch there are none (drop the flag, or fine-tune --model without --from_scratch).")
    if args.add_data_genes and not args.model:
        raise ValueError("--add_data_genes grows a pretrained --model folder's vocabulary by the data's genes; without "
                         "a folder the vocabulary is already every gene of the data (drop the flag).")
    if args.encoder_learning_rate_scale < 0:
        raise ValueError(f"--encoder_learning_rate_scale takes a multiple of --learning_rate >= 0 (0 keeps the "
                         f"pretrained layers fixed), got {args.encoder_learning_rate_scale}.")
    if min(args.logit_adjustment_grid) < 0:
        raise ValueError(f"--logit_adjustment_grid takes values >= 0 (0: no adjustment), got {args.logit_adjustment_grid}.")
    accelerator = make_accelerator(args, "finetune")
    set_seed(args.seed)
    adata, tokenizer, dataset = load_labelled_cells(args, accelerator)
    names = dataset.features["label"].names
    check_labels(names, args.label_key)
    labels = np.asarray(dataset["label"])
    split = split_cells(labels, names, args)
    cells = {part: dataset.select(rows) for part, rows in split.items()}
    unlabelled = dataset if args.labelled_per_class is not None else cells["train"]
    select_highly_variable_genes(tokenizer, unlabelled, args)
    model = build_classifier(args, tokenizer, names, unlabelled)

    counts = np.bincount(labels[split["train"]], minlength=len(names)).astype(np.float64)
    compute_loss = model_loss
    if args.class_weighting == "balanced":
        compute_loss = weighted_cross_entropy(torch.tensor(len(split["train"]) / (len(names) * counts),
                                                           dtype=torch.float32))
    sample_weights = 1.0 / counts[labels[split["train"]]] if args.class_sampling == "balanced" else None
    collate = ClassificationCollator(tokenizer, packed=args.packed)
    train_collate = ClassificationCollator(tokenizer, gene_dropout=args.gene_dropout, seed=args.seed, packed=args.packed)
    train_loader = make_loader(cells["train"], train_collate, args.per_device_batch_size, True, args.seed,
                               args.num_workers, sample_weights)
    output = Path(args.output_dir) / "model"

    def evaluate(model) -> dict[str, float]:
        return validation_metrics(accelerator, model, cells["validation"], collate, args.per_device_batch_size)

    early_stopping = EarlyStopping(args.metric_for_best, greater_is_better=args.metric_for_best == "macro_f1",
                                   patience=args.patience,
                                   on_new_best=lambda best: save_model_folder(best, tokenizer, output, accelerator))
    split_digest = hashlib.sha256(np.concatenate(list(split.values())).tobytes()).hexdigest()[:16]
    fingerprint = training_fingerprint([args.data], dataset, tokenizer, f"label={args.label_key};split={split_digest}")
    result = train_loop(accelerator, model, train_loader, args, compute_loss=compute_loss, evaluate=evaluate,
                        early_stopping=early_stopping, identity=run_identity(fingerprint, model, tokenizer.get_vocab()),
                        learning_rate_scales=encoder_learning_rate_scales(model, args.encoder_learning_rate_scale))
    best = accelerator.prepare(AutoModelForSequenceClassification.from_pretrained(
        output, **attention_kwargs(tokenizer.mode, args.attn_implementation)))
    tau = None
    if args.logit_adjustment == "validation":
        tau = adjust_logits_on_validation(accelerator, best, cells["validation"], collate, counts, args)
    expression = tokenizer.encode_matrix(adata, gene_key=args.gene_key)  # [cells, vocabulary genes], log2
    detector, statistics = fit_novelty(accelerator, best, cells, collate, split, expression, tokenizer, args)
    save_model_folder(best, tokenizer, output, accelerator)
    if accelerator.is_main_process:
        save_statistics(statistics, output)
    test = predict_outputs(accelerator, best, cells["test"], collate, args.per_device_batch_size)
    test["expression"] = expression[split["test"]]
    logits, y = test["logits"], test["labels"]
    results = {
        "data": str(args.data),
        "label_key": args.label_key,
        "model_type": model.config.model_type,
        "pretrained_from": args.model,
        "split": {k: int(len(v)) for k, v in split.items()} | ({"kfold": args.kfold, "fold": args.fold} if args.kfold else {})
                 | ({"labelled_per_class": args.labelled_per_class, "train_per_class": dict(zip(
                     names, np.bincount(labels[split["train"]], minlength=len(names)).tolist()))}
                    if args.labelled_per_class is not None else {}),
        "num_classes": len(names),
        "model": {**classification_metrics(y, logits.argmax(-1), names), "train_seconds": result.seconds,
                  "steps": result.step, "epoch_kept": result.best_epoch,
                  f"best_validation_{args.metric_for_best}": result.best_metric}
                 | ({"logit_adjustment_tau": tau} if tau is not None else {}),
        "novelty_detection": {**detector, **flagging_on_known_cells(test, statistics, detector, names)},
    }
    if not args.no_baseline and accelerator.is_main_process:
        results["baseline_logistic_regression_l1"] = logistic_regression_baseline(expression, labels, names, split,
                                                                                   tuple(args.baseline_C))
    if accelerator.is_main_process:
        (Path(args.output_dir) / "results.json").write_text(json.dumps(results, indent=2))
        (Path(args.output_dir) / "split.json").write_text(json.dumps({k: v.tolist() for k, v in split.items()}))
        print_results(results, Path(args.output_dir))
    accelerator.end_training()
    return results


def adjust_logits_on_validation(accelerator, model, validation_cells, collate, counts: np.ndarray,
                                args: argparse.Namespace) -> float:
    """Picks tau on the validation cells and records it with the training class prior in the model's config: the
    head then adds tau * log(prior) to its logits, so the saved folder predicts the adjusted way with no extra code."""
    prior = counts / counts.sum()
    logits, labels = predict(accelerator, model, validation_cells, collate, args.per_device_batch_size)
    tau = choose_logit_adjustment(logits, labels, np.log(prior), args.logit_adjustment_grid)
    config = accelerator.unwrap_model(model).config
    config.class_prior, config.logit_adjustment_tau = prior.tolist(), tau
    return tau


def fit_novelty(accelerator, model, cells: dict, collate, split: dict, expression, tokenizer,
                args: argparse.Namespace):
    """Fits the open-set detector (train/novelty.py) on the training and validation cells and records its settings
    in the model's config; returns them with its statistics."""
    outputs = {part: predict_outputs(accelerator, model, cells[part], collate, args.per_device_batch_size)
               | {"expression": expression[split[part]]} for part in ("train", "validation")}
    detector, statistics = fit_novelty_detector(outputs["train"], outputs["validation"],
                                                accelerator.unwrap_model(model).config.num_labels,
                                                args.novelty_false_flag_rate,
                                                expression_genes=model_expression_genes(tokenizer))
    accelerator.unwrap_model(model).config.novelty_detection = detector
    return detector, statistics


def flagging_on_known_cells(test: dict, statistics, detector: dict, names: list[str]) -> dict:
    """What the detector costs on the test cells, all of known types: the share flagged and the macro-F1 over the
    known types when a flagged cell counts as a wrong answer."""
    from sklearn.metrics import f1_score

    flagged = flag_novel(novelty_scores(test["logits"], test["embeddings"], statistics, test["expression"],
                                        names=detector_score_names(detector)), detector)
    predictions = np.where(flagged, len(names), test["logits"].argmax(-1))
    return {"test_flagged_share": float(flagged.mean()),
            "test_macro_f1_with_flagging": float(f1_score(test["labels"], predictions, labels=np.unique(test["labels"]),
                                                          average="macro", zero_division=0))}


def print_results(results: dict, output_dir: Path) -> None:
    rows = [("scBERT family model (" + results["model_type"] + ")", results["model"])]
    if "baseline_logistic_regression_l1" in results:
        rows.append(("logistic regression (L1), same split", results["baseline_logistic_regression_l1"]))
    print(f"\n{'held-out cells: ' + str(results['split']['test']):<42} {'accuracy':>9} {'macro-F1':>9}")
    for name, metrics in rows:
        print(f"{name:<42} {metrics['accuracy']:>9.4f} {metrics['macro_f1']:>9.4f}")
    worst = sorted(results["model"]["per_class_f1"].items(), key=lambda item: item[1])[:3]
    print("weakest classes (model F1): " + ", ".join(f"{name} {f1:.3f}" for name, f1 in worst))
    print(f"kept the model of epoch {results['model']['epoch_kept']} (best validation "
          f"{next(k for k in results['model'] if k.startswith('best_validation_'))[16:]}); results: "
          f"{output_dir / 'results.json'}")
    print(f"model folder: {output_dir / 'model'} (AutoModelForSequenceClassification.from_pretrained(folder), "
          "AutoTokenizer.from_pretrained(folder); trust_remote_code=True without this package)")


if __name__ == "__main__":
    run_command(main)

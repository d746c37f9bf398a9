"""Pretraining: scBERT 2.0 masked regression (bin + value of hidden genes) or scBERT's masked language modelling.

    scbert pretrain --data cells.h5ad --architecture scbert2-moe --output_dir runs/pretrain
    scbert pretrain --corpus ../shared/data/pretrain papalexi.h5ad --architecture scbert2-small --output_dir runs/pt
    scbert pretrain --corpus ../shared/data/pretrain --architecture scbert-small --panel_genes 1500 --output_dir runs/v1
    accelerate launch -m train.pretrain --data cells.h5ad --model runs/pretrain/model --output_dir runs/more  # continue

--data tokenizes the files under the first file's genes. --corpus builds a pretraining corpus instead (train/corpus.py):
QC of every file with scanpy, one vocabulary of human symbols (mouse genes through orthologs), unexpressed genes
drawn from each file's own panel, and a held-out share of the cells scored during training (masked-bin accuracy and
cross-entropy, masked-value MSE); for scBERT v1 the vocabulary is narrowed to a panel of the corpus's highly variable
genes (--panel_genes). The final model and tokenizer are written to OUTPUT_DIR/model, loadable with
AutoModelForMaskedLM.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from accelerate.utils import set_seed
from transformers import AutoModelForMaskedLM

from tokenization import GeneExpressionTokenizer
from train.cli import run_command
from train.corpus import QCSettings, build_corpus
from train.data import MaskedExpressionCollator, load_tokenized_dataset, make_loader, read_h5ad, training_fingerprint
from train.genes import initialise_gene_embeddings, select_highly_variable_genes
from train.loop import add_training_arguments, make_accelerator, run_identity, train_loop
from train.metrics import masked_expression_metrics
from train.models import (
    architecture_config,
    architecture_mode,
    attention_kwargs,
    load_pretrained_folder,
    parse_overrides,
    save_model_folder,
    tokenizer_overrides,
)

# scBERT v1 attends over every panel gene of every cell: about 2,000 genes keep a small v1 trainable on a CPU.
DEFAULT_V1_PANEL_GENES = 1500


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scbert pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cells = parser.add_mutually_exclusive_group(required=True)
    cells.add_argument("--data", nargs="+", help=".h5ad files, or one saved datasets folder")
    cells.add_argument("--corpus", nargs="+", help="a pretraining corpus: .h5ad files of raw counts and/or folders of them")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a pretrained folder to continue from (its tokenizer is used)")
    source.add_argument("--architecture", default="scbert2-moe",
                        help="scbert2-tiny | scbert2-small | scbert2-moe | scbert-small | scbert")
    parser.add_argument("--max_length", type=int, default=1024, help="scBERT 2.0: tokens per cell (most expressed)")
    parser.add_argument("--zero_fraction", type=float, default=0.1,
                        help="scBERT 2.0: each cell gains this share (of its expressed count) of unexpressed genes, "
                             "drawn per batch (0 for scBERT v1, which sees every gene)")
    parser.add_argument("--mask_probability", type=float, default=0.15)
    parser.add_argument("--config_overrides", default=None,
                        help="a new model: config fields over the --architecture preset, KEY=VALUE,... or a "
                             "config.json (e.g. feature_redraw_interval=null)")
    parser.add_argument("--panel_genes", type=int, default=None,
                        help=f"scBERT v1 with --corpus: its fixed panel, the highly variable genes of the corpus "
                             f"(this many by each of two flavours; default {DEFAULT_V1_PANEL_GENES})")
    parser.add_argument("--gene_key", default=None, help="var column with gene names (default: var_names)")
    qc = parser.add_argument_group("corpus (--corpus)")
    defaults = QCSettings()
    qc.add_argument("--min_genes", type=int, default=defaults.min_genes, help="QC: least expressed genes per cell")
    qc.add_argument("--min_genes_targeted", type=int, default=defaults.min_genes_targeted,
                    help="QC: least expressed genes per cell of a targeted panel (a file of fewer than "
                         "--targeted_panel_genes genes)")
    qc.add_argument("--targeted_panel_genes", type=int, default=defaults.targeted_panel_genes)
    qc.add_argument("--max_mito_pct", type=float, default=defaults.max_mito_pct,
                    help="QC: most mitochondrial share of a cell's counts, in per cent")
    qc.add_argument("--min_cells", type=int, default=defaults.min_cells, help="QC: least cells expressing a gene")
    qc.add_argument("--min_cells_per_vocab_gene", type=int, default=defaults.min_cells_per_vocab_gene,
                    help="vocabulary: least corpus cells expressing a gene")
    qc.add_argument("--min_panel_genes", type=int, default=defaults.min_panel_genes,
                    help="refuse a file sharing fewer genes with the vocabulary")
    qc.add_argument("--corpus_values", choices=["counts", "normalized"], default=defaults.values,
                    help="what the corpus files hold; a file holding the other is refused")
    qc.add_argument("--held_out", type=float, default=0.05, help="share of corpus cells held out and scored")
    qc.add_argument("--file_sampling_exponent", type=float, default=1.0,
                    help="each corpus file's share of the training draws is proportional to its cells to this power: "
                         "1 takes every cell once per epoch (a large file dominates), 0 draws every file equally, "
                         "0.3 balances as multilingual language models balance languages (XLM-R); below 1 an epoch "
                         "is as many draws with replacement as there are training cells")
    add_training_arguments(parser)
    parser.set_defaults(num_epochs=3)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def qc_settings(args: argparse.Namespace) -> QCSettings:
    return QCSettings(min_genes=args.min_genes, min_genes_targeted=args.min_genes_targeted,
                      targeted_panel_genes=args.targeted_panel_genes, max_mito_pct=args.max_mito_pct,
                      min_cells=args.min_cells, min_cells_per_vocab_gene=args.min_cells_per_vocab_gene,
                      min_panel_genes=args.min_panel_genes, values=args.corpus_values)


def load_cells(args: argparse.Namespace, accelerator, tokenizer: GeneExpressionTokenizer | None):
    """The tokenizer (``tokenizer``, the corpus's or a new one), the tokenized cells, each file's panel (corpus
    only) and the corpus report."""
    if args.corpus:
        if args.model:
            raise ValueError("--corpus builds a new vocabulary; to continue a pretrained --model, pass --data.")
        with accelerator.main_process_first():
            corpus = build_corpus(args.corpus, qc_settings(args), args.max_length, args.cache_dir, accelerator.print,
                                  panel_genes=corpus_panel_genes(args))
        return corpus.tokenizer, corpus.dataset, corpus.panels, corpus.report
    if tokenizer is None:
        tokenizer = GeneExpressionTokenizer.from_adata(read_h5ad(args.data[0]), gene_key=args.gene_key,
                                                       mode=architecture_mode(args.architecture),
                                                       max_length=args.max_length, **tokenizer_overrides(args))
    with accelerator.main_process_first():
        dataset = load_tokenized_dataset(args.data, tokenizer, cache_dir=args.cache_dir)
    return tokenizer, dataset, None, None


def corpus_panel_genes(args: argparse.Namespace) -> int | None:
    """--panel_genes for a scBERT v1 corpus (default DEFAULT_V1_PANEL_GENES); refused for scBERT 2.0."""
    if architecture_mode(args.architecture) == "scbert2":
        if args.panel_genes is not None:
            raise ValueError("--panel_genes sizes a scBERT v1 panel; scBERT 2.0 reads the whole vocabulary (use "
                             "--max_length for its tokens per cell).")
        return None
    return DEFAULT_V1_PANEL_GENES if args.panel_genes is None else args.panel_genes


def config_overrides(args: argparse.Namespace, tokenizer: GeneExpressionTokenizer) -> dict:
    """--config_overrides, each key checked against the preset's config."""
    if not args.config_overrides:
        return {}
    overrides = parse_overrides(args.config_overrides)
    preset = architecture_config(args.architecture, tokenizer)
    unknown = sorted(key for key in overrides if not hasattr(preset, key))
    if unknown:
        raise ValueError(f"--config_overrides: {unknown} are not fields of the {preset.model_type} config.")
    return overrides


def split_held_out(dataset, share: float, seed: int):
    """(training cells, held-out cells or None)."""
    if not share:
        return dataset, None
    if not 0 < share < 0.5:
        raise ValueError(f"--held_out must be in [0, 0.5), got {share}.")
    parts = dataset.train_test_split(test_size=share, seed=seed)
    return parts["train"], parts["test"]


def check_file_sampling(args: argparse.Namespace) -> None:
    if not 0 <= args.file_sampling_exponent <= 1:
        raise ValueError(f"--file_sampling_exponent must be in [0, 1] (1: files as they come, 0: every file equally), "
                         f"got {args.file_sampling_exponent}.")
    if args.file_sampling_exponent != 1 and not args.corpus:
        raise ValueError("--file_sampling_exponent balances the files of a --corpus; with --data the cells carry no "
                         "file of origin. Pass the files with --corpus, or leave the exponent at 1.")


def file_sampling_weights(panel: np.ndarray, n_files: int, exponent: float) -> tuple[np.ndarray | None, list[float]]:
    """(one sampling weight per cell or None, each file's share of the draws) for ``--file_sampling_exponent``.

    ``panel`` holds each training cell's file index. File f of n_f cells gets a share proportional to n_f ** exponent,
    spread evenly over its cells; None (every cell once per epoch) for exponent 1."""
    cells_per_file = np.bincount(panel, minlength=n_files).astype(np.float64)
    shares = np.where(cells_per_file > 0, cells_per_file ** exponent, 0.0)
    shares /= shares.sum()
    weights = None if exponent == 1 else shares[panel] / cells_per_file[panel]
    return weights, shares.tolist()


def corpus_sample_weights(args: argparse.Namespace, train_cells, corpus_report: dict, log) -> np.ndarray | None:
    """Per-cell weights balancing the corpus's files, each file's share logged and added to the report."""
    files = [Path(f["file"]).name for f in corpus_report["files"]]
    weights, shares = file_sampling_weights(np.asarray(train_cells["panel"]), len(files), args.file_sampling_exponent)
    corpus_report["file_sampling"] = {"exponent": args.file_sampling_exponent,
                                      "shares": {name: round(share, 4) for name, share in zip(files, shares)}}
    log(f"Each file's share of the training draws (--file_sampling_exponent {args.file_sampling_exponent}): "
        + ", ".join(f"{name} {share:.1%}" for name, share in zip(files, shares)))
    return weights


def main(argv=None) -> Path:
    args = parse_args(argv)
    check_file_sampling(args)
    accelerator = make_accelerator(args, "pretrain")
    set_seed(args.seed)
    config, tokenizer = load_pretrained_folder(args.model, **tokenizer_overrides(args)) if args.model else (None, None)
    tokenizer, dataset, panels, corpus_report = load_cells(args, accelerator, tokenizer)
    if args.model and args.config_overrides:
        raise ValueError("--config_overrides shapes a new model; a continued --model keeps its own config.")
    if args.model:
        model = AutoModelForMaskedLM.from_pretrained(args.model, **attention_kwargs(config.model_type,
                                                                                    args.attn_implementation))
    else:
        config = architecture_config(args.architecture, tokenizer, **config_overrides(args, tokenizer))
        model = AutoModelForMaskedLM.from_config(config, **attention_kwargs(config.model_type, args.attn_implementation))
    train_cells, held_out = split_held_out(dataset, args.held_out if args.corpus else 0.0, args.seed)
    select_highly_variable_genes(tokenizer, train_cells, args)
    sample_weights = corpus_sample_weights(args, train_cells, corpus_report, accelerator.print) if args.corpus else None
    if not args.model:
        # The start sees the cells as training draws them: a file's weight is its share of the draws.
        initialise_gene_embeddings(model, train_cells, tokenizer, args, cell_weights=sample_weights)
    n_parameters = sum(p.numel() for p in model.parameters())
    accelerator.print(f"Pretraining {config.model_type} ({n_parameters / 1e6:.2f}M parameters) on "
                      f"{len(train_cells):,} cells" + (f", {len(held_out):,} held out." if held_out else "."))
    zero_fraction = args.zero_fraction if tokenizer.mode == "scbert2" else 0.0
    collator = MaskedExpressionCollator(tokenizer, args.mask_probability, seed=args.seed, zero_fraction=zero_fraction,
                                        packed=args.packed, panels=panels)
    loader = make_loader(train_cells, collator, args.per_device_batch_size, True, args.seed, args.num_workers,
                         sample_weights)
    evaluate = None
    if held_out is not None:
        # Another seed than training's, fixed: every evaluation scores the same masks.
        eval_collator = MaskedExpressionCollator(tokenizer, args.mask_probability, seed=args.seed + 1,
                                                 zero_fraction=zero_fraction, panels=panels)
        evaluate = lambda m: masked_expression_metrics(accelerator, m, held_out, eval_collator,  # noqa: E731
                                                       args.per_device_batch_size)
    # The corpus's files as QC read them (folders expanded), named once in its report.
    sources = [f["file"] for f in corpus_report["files"]] if args.corpus else args.data
    identity = run_identity(training_fingerprint([str(s) for s in sources], train_cells, tokenizer), model,
                            tokenizer.get_vocab())
    result = train_loop(accelerator, model, loader, args, evaluate=evaluate, identity=identity)
    output = Path(args.output_dir) / "model"
    save_model_folder(model, tokenizer, output, accelerator)
    # Every process evaluates (the metrics are reduced across them); the main one writes.
    final_scores = evaluate(accelerator.unwrap_model(model)) if evaluate is not None else None
    if accelerator.is_main_process:
        summary = {"steps": result.step, "seconds": result.seconds, "cells": len(train_cells), "parameters": n_parameters,
                   "held_out_cells": len(held_out) if held_out is not None else 0}
        if final_scores is not None:
            summary["held_out"] = final_scores
        if corpus_report is not None:
            summary["corpus"] = corpus_report
            (output / "pretraining_corpus.json").write_text(json.dumps(corpus_report, indent=2))
        (Path(args.output_dir) / "pretrain_summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(f"Saved {output} after {result.step} steps in {result.seconds:.0f} s.")
    accelerator.end_training()
    return output


if __name__ == "__main__":
    run_command(main)

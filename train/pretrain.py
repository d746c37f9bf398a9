"""Pretraining: scBERT 2.0 masked regression (bin + value of hidden genes) or scBERT's masked language modelling.

    scbert pretrain --data cells.h5ad --architecture scbert2-moe --output_dir runs/pretrain
    accelerate launch -m train.pretrain --data cells.h5ad --model runs/pretrain/model --output_dir runs/more  # continue

The final model and tokenizer are written to OUTPUT_DIR/model, loadable with AutoModelForMaskedLM.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from accelerate.utils import set_seed
from transformers import AutoModelForMaskedLM

from tokenization import GeneExpressionTokenizer
from train.cli import run_command
from train.data import MaskedExpressionCollator, load_tokenized_dataset, make_loader, read_h5ad, training_fingerprint
from train.genes import initialise_gene_embeddings, select_highly_variable_genes
from train.loop import add_training_arguments, make_accelerator, run_identity, train_loop
from train.models import (
    architecture_config,
    architecture_mode,
    attention_kwargs,
    load_pretrained_folder,
    save_model_folder,
    tokenizer_overrides,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scbert pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help=".h5ad files, or one saved datasets folder")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a pretrained folder to continue from (its tokenizer is used)")
    source.add_argument("--architecture", default="scbert2-moe",
                        help="scbert2-tiny | scbert2-small | scbert2-moe | scbert-small | scbert")
    parser.add_argument("--max_length", type=int, default=1024, help="scBERT 2.0: tokens per cell (most expressed)")
    parser.add_argument("--zero_fraction", type=float, default=0.1,
                        help="scBERT 2.0: each cell gains this share (of its expressed count) of unexpressed genes, "
                             "drawn per batch (0 for scBERT v1, which sees every gene)")
    parser.add_argument("--mask_probability", type=float, default=0.15)
    parser.add_argument("--gene_key", default=None, help="var column with gene names (default: var_names)")
    add_training_arguments(parser)
    parser.set_defaults(num_epochs=3)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    accelerator = make_accelerator(args, "pretrain")
    set_seed(args.seed)
    if args.model:
        config, tokenizer = load_pretrained_folder(args.model, **tokenizer_overrides(args))
        model = AutoModelForMaskedLM.from_pretrained(args.model, **attention_kwargs(config.model_type,
                                                                                    args.attn_implementation))
    else:
        tokenizer = GeneExpressionTokenizer.from_adata(read_h5ad(args.data[0]), gene_key=args.gene_key,
                                                       mode=architecture_mode(args.architecture),
                                                       max_length=args.max_length, **tokenizer_overrides(args))
        config = architecture_config(args.architecture, tokenizer)
        model = AutoModelForMaskedLM.from_config(config, **attention_kwargs(config.model_type, args.attn_implementation))
    with accelerator.main_process_first():
        dataset = load_tokenized_dataset(args.data, tokenizer, cache_dir=args.cache_dir)
    select_highly_variable_genes(tokenizer, dataset, args)
    if not args.model:
        initialise_gene_embeddings(model, dataset, tokenizer, args)
    n_parameters = sum(p.numel() for p in model.parameters())
    accelerator.print(f"Pretraining {config.model_type} ({n_parameters / 1e6:.2f}M parameters) on {len(dataset):,} cells.")
    zero_fraction = args.zero_fraction if tokenizer.mode == "scbert2" else 0.0
    collator = MaskedExpressionCollator(tokenizer, args.mask_probability, seed=args.seed, zero_fraction=zero_fraction,
                                        packed=args.packed)
    loader = make_loader(dataset, collator, args.per_device_batch_size, True, args.seed, args.num_workers)
    identity = run_identity(training_fingerprint(args.data, dataset, tokenizer), model, tokenizer.get_vocab())
    result = train_loop(accelerator, model, loader, args, identity=identity)
    output = Path(args.output_dir) / "model"
    save_model_folder(model, tokenizer, output, accelerator)
    if accelerator.is_main_process:
        summary = {"steps": result.step, "seconds": result.seconds, "cells": len(dataset), "parameters": n_parameters}
        (Path(args.output_dir) / "pretrain_summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(f"Saved {output} after {result.step} steps in {result.seconds:.0f} s.")
    accelerator.end_training()
    return output


if __name__ == "__main__":
    run_command(main)

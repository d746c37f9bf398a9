"""Pretraining: scBERT 2.0 masked regression (bin + value of hidden genes) or scBERT's masked language modelling.

    accelerate launch train/pretrain.py --data cells.h5ad --architecture scbert2-moe --output_dir runs/pretrain
    accelerate launch train/pretrain.py --data cells.h5ad --model runs/pretrain/model --output_dir runs/more  # continue

The final model and tokenizer are written to OUTPUT_DIR/model, loadable with AutoModelForMaskedLM.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from accelerate.utils import set_seed
from transformers import AutoModelForMaskedLM

if __package__ in (None, ""):  # `accelerate launch train/pretrain.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenization import GeneExpressionTokenizer  # noqa: E402
from train.training import (  # noqa: E402
    MaskedExpressionCollator,
    add_training_arguments,
    architecture_mode,
    architecture_config,
    load_pretrained_folder,
    load_tokenized_dataset,
    initialise_gene_embeddings,
    make_accelerator,
    read_h5ad,
    save_model_folder,
    select_highly_variable_genes,
    train_loop,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help=".h5ad files, or one saved datasets folder")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a pretrained folder to continue from (its tokenizer is used)")
    source.add_argument("--architecture", default="scbert2-moe",
                        help="scbert2-tiny | scbert2-small | scbert2-moe | scbert-small | scbert")
    parser.add_argument("--max_length", type=int, default=1024, help="scBERT 2.0: tokens per cell (most expressed)")
    parser.add_argument("--zero_fraction", type=float, default=0.1, help="scBERT 2.0: share of unexpressed genes added")
    parser.add_argument("--mask_probability", type=float, default=0.15)
    parser.add_argument("--gene_key", default=None, help="var column with gene names (default: var_names)")
    add_training_arguments(parser)
    parser.set_defaults(num_epochs=3)
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    accelerator = make_accelerator(args, "pretrain")
    set_seed(args.seed)
    if args.model:
        config, tokenizer = load_pretrained_folder(args.model)
        model = AutoModelForMaskedLM.from_pretrained(args.model)
    else:
        first = read_h5ad(args.data[0])
        tokenizer = GeneExpressionTokenizer.from_adata(
            first, gene_key=args.gene_key, mode=architecture_mode(args.architecture), max_length=args.max_length, zero_fraction=args.zero_fraction
        )
        del first
        config = architecture_config(args.architecture, tokenizer)
        model = AutoModelForMaskedLM.from_config(config)
    with accelerator.main_process_first():
        dataset = load_tokenized_dataset(args.data, tokenizer, cache_dir=args.cache_dir)
    select_highly_variable_genes(tokenizer, dataset, args)
    if not args.model:
        initialise_gene_embeddings(model, dataset, tokenizer, args)
    n_parameters = sum(p.numel() for p in model.parameters())
    accelerator.print(f"Pretraining {config.model_type} ({n_parameters / 1e6:.2f}M parameters) on {len(dataset):,} cells.")
    result = train_loop(accelerator, model, dataset, MaskedExpressionCollator(tokenizer, args.mask_probability, seed=args.seed), args)
    output = Path(args.output_dir) / "model"
    save_model_folder(model, tokenizer, output, accelerator)
    if accelerator.is_main_process:
        summary = {"steps": result.step, "seconds": result.seconds, "cells": len(dataset), "parameters": n_parameters}
        (Path(args.output_dir) / "pretrain_summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(f"Saved {output} after {result.step} steps in {result.seconds:.0f} s.")
    accelerator.end_training()
    return output


if __name__ == "__main__":
    main()

"""The end-to-end main job: fine-tune the shipped pretrained scBERT 2.0 for cell types, compare with the baseline,
annotate every cell and draw the UMAP of the cell embeddings.

    python -m train.main                                  # Baron mouse pancreas from checkpoints/scbert2-small
    scbert main --data my.h5ad --label_key cell_type --model checkpoints/scbert2-moe --output_dir runs/my
    scbert main --data my.h5ad --label_key cell_type --pretrain_epochs 2     # continue pretraining on my cells first

Runs `-m train.finetune` (and, with --pretrain_epochs, `-m train.pretrain` first) as their own processes (the same
commands a user runs with `accelerate launch`), then writes OUTPUT_DIR/model: a Hub-ready folder (safetensors
weights, config, tokenizer, remote-code sources, results.json), OUTPUT_DIR/annotated.h5ad (every cell with its
predicted type, confidence, split and embedding) and OUTPUT_DIR/umap.png, and prints the results table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from train.cli import run_command

ROOT = Path(__file__).resolve().parents[1]
BARON = ROOT.parent / "shared" / "data" / "celltype" / "baron_mouse_pancreas.h5ad"
CHECKPOINT = ROOT / "checkpoints" / "scbert2-small"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scbert main", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(BARON), help="labelled .h5ad (raw counts or log-normalised)")
    parser.add_argument("--label_key", default="cell_type1")
    parser.add_argument("--model", default=str(CHECKPOINT), help="the pretrained folder to start from")
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "main"))
    parser.add_argument("--pretrain_epochs", type=int, default=0,
                        help="continue pretraining the model on the data's cells for this many epochs first")
    parser.add_argument("--finetune_epochs", type=int, default=20)
    parser.add_argument("--highly_variable_genes", type=int, default=2000,
                        help="fine-tuning draws the tokens from the highly variable genes of the training cells, as "
                             "finetune.py does by default (0: the most expressed genes)")
    parser.add_argument("--max_length", type=int, default=512,
                        help="tokens per cell at most (the most expressed of those genes): 256 annotates about 1.4x "
                             "faster (benchmarks/results/annotate_speed/README.md)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--launcher", default=f"{sys.executable}",
                        help="how to start each stage, e.g. 'accelerate launch --num_processes 2 --multi_gpu'")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks, the stages' too")
    return parser.parse_args(argv)


def run_stage(launcher: str, module: str, arguments: list[str]) -> None:
    """Runs one stage as its own process; a failed stage has printed its own error, which this names."""
    command = launcher.split() + ["-m", module] + arguments
    print("$ " + " ".join(command), flush=True)
    completed = subprocess.run(command, cwd=ROOT)
    if completed.returncode != 0:
        raise RuntimeError(f"the {module} stage failed (exit status {completed.returncode}); its error is printed "
                           "above.")


def main(argv=None) -> dict:
    args = parse_args(argv)
    output = Path(args.output_dir)
    if not (Path(args.model) / "config.json").exists():
        raise FileNotFoundError(f"{args.model} is not a model folder. The shipped checkpoints are in checkpoints/ "
                                "of the repository (bash checkpoints/build.sh rebuilds them).")
    common = ["--seed", str(args.seed), "--per_device_batch_size", str(args.batch_size), "--learning_rate",
              str(args.learning_rate), "--cache_dir", str(output / "cache")] + (["--debug"] if args.debug else [])
    start = time.perf_counter()
    model = args.model
    if args.pretrain_epochs:
        run_stage(args.launcher, "train.pretrain", [
            "--data", args.data, "--model", args.model, "--num_epochs", str(args.pretrain_epochs),
            "--output_dir", str(output / "pretrain"), "--checkpointing_steps", "50", "--resume_from_checkpoint",
            "latest", *common])
        model = str(output / "pretrain" / "model")
    run_stage(args.launcher, "train.finetune", [
        "--data", args.data, "--label_key", args.label_key, "--model", model, "--num_epochs",
        str(args.finetune_epochs), "--patience", "5", "--highly_variable_genes", str(args.highly_variable_genes),
        "--max_length", str(args.max_length),
        "--output_dir", str(output / "finetune"), *common])
    results = json.loads((output / "finetune" / "results.json").read_text())
    if args.pretrain_epochs:
        results["pretrain"] = json.loads((output / "pretrain" / "pretrain_summary.json").read_text())
    folder = output / "model"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(output / "finetune" / "model", folder)
    results["annotation"] = write_annotation(args, folder, output)
    results["total_seconds"] = time.perf_counter() - start
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results, folder)
    return results


def write_annotation(args: argparse.Namespace, folder: Path, output: Path) -> dict:
    """Annotates every cell with the fine-tuned folder; writes annotated.h5ad and the UMAP of the embeddings."""
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    from train.annotate import annotate
    from train.data import read_h5ad

    adata = annotate(read_h5ad(args.data), folder)
    split = json.loads((output / "finetune" / "split.json").read_text())
    adata.obs["scbert_split"] = "unused"
    for part, rows in split.items():
        adata.obs.iloc[rows, adata.obs.columns.get_loc("scbert_split")] = part
    sc.pp.neighbors(adata, use_rep="X_scbert", random_state=args.seed)
    sc.tl.umap(adata, random_state=args.seed)
    figure = sc.pl.umap(adata, color=["scbert_cell_type", args.label_key], show=False, return_fig=True,
                        title=["predicted (scBERT 2.0)", f"annotated ({args.label_key})"], wspace=0.6)
    figure.savefig(output / "umap.png", dpi=110, bbox_inches="tight")
    adata.write_h5ad(output / "annotated.h5ad")
    return {"annotated": str(output / "annotated.h5ad"), "umap": str(output / "umap.png"),
            "cells": int(adata.n_obs), "seconds": adata.uns["scbert"]["seconds"]}


def print_table(results: dict, folder: Path) -> None:
    baseline = results.get("baseline_logistic_regression_l1")
    model = results["model"]
    print("\n== scbert-hf main job ==")
    print(f"data: {results['data']} ({results['num_classes']} cell types; cells train/validation/test: "
          f"{results['split']['train']}/{results['split']['validation']}/{results['split']['test']})")
    print(f"started from {results['pretrained_from']}; fine-tuning kept epoch {model['epoch_kept']}; "
          f"total {results['total_seconds']:.0f} s")
    print(f"{'model':<40} {'accuracy':>9} {'macro-F1':>9}")
    print(f"{'scBERT 2.0 (' + results['model_type'] + ', fine-tuned)':<40} {model['accuracy']:>9.4f} "
          f"{model['macro_f1']:>9.4f}")
    if baseline:
        print(f"{'logistic regression (L1, C=' + str(baseline['C']) + ')':<40} {baseline['accuracy']:>9.4f} "
              f"{baseline['macro_f1']:>9.4f}")
    worst = sorted(model["per_class_f1"].items(), key=lambda item: item[1])[:3]
    print("weakest classes (model F1 / baseline F1): " + ", ".join(
        f"{name} {f1:.3f} / {baseline['per_class_f1'][name]:.3f}" if baseline else f"{name} {f1:.3f}"
        for name, f1 in worst))
    print(f"results: {folder / 'results.json'}; every cell annotated: {results['annotation']['annotated']}; "
          f"UMAP: {results['annotation']['umap']}")
    print(f"Hub-ready folder: {folder}\n  use it: AutoTokenizer.from_pretrained(folder) and "
          "AutoModelForSequenceClassification.from_pretrained(folder) after `import modeling_scbert, tokenization` "
          "(or trust_remote_code=True without this package); see the README's 'Annotate your cells'.")


if __name__ == "__main__":
    run_command(main)

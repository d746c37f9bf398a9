"""The end-to-end main job: pretrain a small scBERT 2.0 MoE, fine-tune it for cell types, compare with the baseline.

    python -m train.main                                  # Baron mouse pancreas, defaults take ~10 min on 2 cores
    scbert main --data my.h5ad --label_key cell_type --pretrain_epochs 20 --finetune_epochs 30 --output_dir runs/my

Runs `-m train.pretrain` and `-m train.finetune` as their own processes (the same commands a user runs with
`accelerate launch`), then writes OUTPUT_DIR/model: a Hub-ready folder (safetensors weights, config, tokenizer,
remote-code sources, results.json) and prints the results table.
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scbert main", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(BARON), help="labelled .h5ad (raw counts or log-normalised)")
    parser.add_argument("--label_key", default="cell_type1")
    parser.add_argument("--architecture", default="scbert2-moe")
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "main"))
    parser.add_argument("--pretrain_epochs", type=int, default=2)
    parser.add_argument("--finetune_epochs", type=int, default=20)
    parser.add_argument("--max_length", type=int, default=512, help="tokens per cell at most, as finetune.py")
    parser.add_argument("--highly_variable_genes", type=int, default=2000,
                        help="both stages draw the tokens from the highly variable genes of their cells, as "
                             "finetune.py does by default (0: the most expressed genes)")
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
    common = ["--seed", str(args.seed), "--highly_variable_genes", str(args.highly_variable_genes),
              "--per_device_batch_size", str(args.batch_size), "--learning_rate", str(args.learning_rate),
              "--cache_dir", str(output / "cache")] + (["--debug"] if args.debug else [])
    start = time.perf_counter()
    run_stage(args.launcher, "train.pretrain", [
        "--data", args.data, "--architecture", args.architecture, "--max_length", str(args.max_length),
        "--num_epochs", str(args.pretrain_epochs), "--output_dir", str(output / "pretrain"),
        "--checkpointing_steps", "50", "--resume_from_checkpoint", "latest", *common])
    pretrain_seconds = time.perf_counter() - start
    run_stage(args.launcher, "train.finetune", [
        "--data", args.data, "--label_key", args.label_key, "--model", str(output / "pretrain" / "model"),
        "--num_epochs", str(args.finetune_epochs), "--patience", "5", "--output_dir", str(output / "finetune"),
        *common])
    results = json.loads((output / "finetune" / "results.json").read_text())
    results["pretrain"] = json.loads((output / "pretrain" / "pretrain_summary.json").read_text())
    results["pretrain"]["wall_seconds"] = pretrain_seconds
    results["total_seconds"] = time.perf_counter() - start

    folder = output / "model"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(output / "finetune" / "model", folder)
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results, folder)
    return results


def print_table(results: dict, folder: Path) -> None:
    baseline = results.get("baseline_logistic_regression_l1")
    model = results["model"]
    print("\n== scbert-hf main job ==")
    print(f"data: {results['data']} ({results['num_classes']} cell types; cells train/validation/test: "
          f"{results['split']['train']}/{results['split']['validation']}/{results['split']['test']})")
    print(f"pretraining: {results['pretrain']['steps']} steps, {results['pretrain']['parameters'] / 1e6:.2f}M parameters, "
          f"{results['pretrain']['wall_seconds']:.0f} s; fine-tuning kept epoch {model['epoch_kept']}; "
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
    print(f"results: {folder / 'results.json'}")
    print(f"Hub-ready folder: {folder}\n  use it: AutoTokenizer.from_pretrained(folder) and "
          "AutoModelForSequenceClassification.from_pretrained(folder) after `import modeling_scbert, tokenization` "
          "(or trust_remote_code=True without this package); see the README's 'Annotate your cells'.")


if __name__ == "__main__":
    run_command(main)

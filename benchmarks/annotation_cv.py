"""Cell type annotation quality: k-fold cross-validation of fine-tuned scBERT 2.0 against L1 logistic regression.

    python -m benchmarks.annotation_cv                                   # Baron mouse pancreas, 5 folds
    python -m benchmarks.annotation_cv --data other.h5ad --label_key cell_type --pretrained runs/pt/model
    python -m benchmarks.annotation_cv --data pbmc68k_reduced             # scanpy's Zheng68K subset, another tissue

`--data pbmc68k_reduced` writes scanpy's bundled 700 PBMCs (10x, human, 10 FACS-sorted `bulk_labels`) with their
log-normalised `.raw` values (765 genes) to an .h5ad under --output_dir first: .X of that object is z-scored, which
the tokenizer rejects.

Every fold runs `python -m train.finetune` (its own process) with `--kfold K --fold i`, so the model and the
baseline see the same train/validation/test cells. Writes benchmarks/results/annotation/annotation_cv_<name>.json
and .md (a folder of its own: run.py clears the JSON files of benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.measure import machine_info

ROOT = Path(__file__).resolve().parents[1]
BARON = ROOT.parent / "shared" / "data" / "celltype" / "baron_mouse_pancreas.h5ad"
BUNDLED_LABEL_KEYS = {"pbmc68k_reduced": "bulk_labels"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(BARON))
    parser.add_argument("--label_key", default=None,
                        help="obs column of the cell types (default: cell_type1, or bulk_labels for pbmc68k_reduced)")
    parser.add_argument("--name", default=None, help="results file suffix (default: the data file's stem)")
    parser.add_argument("--kfold", type=int, default=5)
    parser.add_argument("--pretrained", default=None, help="a pretrained folder to fine-tune; default: from scratch")
    parser.add_argument("--architecture", default="scbert2-small", help="from scratch only")
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "annotation_cv"))
    parser.add_argument("--results_dir", default=str(ROOT / "benchmarks" / "results" / "annotation"))
    parser.add_argument("finetune_args", nargs=argparse.REMAINDER,
                        help="after '--': extra train.finetune flags, e.g. -- --num_epochs 20 --max_length 512")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    name = args.name or Path(args.data).stem
    resolve_data(args)
    extra = [a for a in args.finetune_args if a != "--"]
    source = ["--model", args.pretrained] if args.pretrained else ["--architecture", args.architecture]
    folds = []
    start = time.perf_counter()
    for fold in range(args.kfold):
        out = Path(args.output_dir) / name / f"fold{fold}"
        command = [sys.executable, "-m", "train.finetune", "--data", args.data, "--label_key",
                   args.label_key, "--kfold", str(args.kfold), "--fold", str(fold), "--output_dir", str(out),
                   "--no_progress_bar", *source, *extra]
        print("$ " + " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
        folds.append(json.loads((out / "results.json").read_text()))
    summary = {
        "data": args.data,
        "label_key": args.label_key,
        "kfold": args.kfold,
        "model_source": args.pretrained or f"{args.architecture} from scratch",
        "finetune_args": extra,
        "machine": machine_info(),
        "wall_seconds": time.perf_counter() - start,
        "class_counts": class_counts(args.data, args.label_key),
        "folds": folds,
    }
    for key in ("model", "baseline_logistic_regression_l1"):
        for metric in ("accuracy", "macro_f1"):
            values = np.array([fold[key][metric] for fold in folds])
            summary.setdefault("mean", {}).setdefault(key, {})[metric] = float(values.mean())
            summary.setdefault("std", {}).setdefault(key, {})[metric] = float(values.std())
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"annotation_cv_{name}.json").write_text(json.dumps(summary, indent=2))
    table = render_table(summary, name)
    (results_dir / f"annotation_cv_{name}.md").write_text(table)
    print(table)
    return summary


def resolve_data(args: argparse.Namespace) -> None:
    """Sets ``args.label_key``'s default and turns a bundled data set's name into the path of its .h5ad."""
    args.label_key = args.label_key or BUNDLED_LABEL_KEYS.get(args.data, "cell_type1")
    if args.data in BUNDLED_LABEL_KEYS:
        args.data = str(write_bundled_dataset(args.data, Path(args.output_dir)))


def write_bundled_dataset(name: str, output_dir: Path) -> Path:
    """Write scanpy's pbmc68k_reduced with its log-normalised values as .X, once."""
    import anndata
    import scanpy as sc

    path = output_dir / f"{name}.h5ad"
    if not path.exists():
        bundled = sc.datasets.pbmc68k_reduced()
        adata = anndata.AnnData(X=bundled.raw.X.copy(), obs=bundled.obs[[BUNDLED_LABEL_KEYS[name]]].copy(),
                                var=bundled.raw.var[[]].copy())
        path.parent.mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(path)
    return path


def class_counts(path: str, label_key: str) -> dict[str, int]:
    import anndata

    labels = anndata.read_h5ad(path, backed="r").obs[label_key].astype(str)
    return {str(name): int(count) for name, count in labels.value_counts().sort_index().items()}


def render_table(summary: dict, name: str) -> str:
    rows = [f"### Cell type annotation, {summary['kfold']}-fold CV on {name} ({summary['model_source']})", "",
            "| model | accuracy (mean ± sd) | macro-F1 (mean ± sd) | per-fold macro-F1 |", "|---|---|---|---|"]
    labels = {"model": "scBERT 2.0 fine-tuned", "baseline_logistic_regression_l1": "L1 logistic regression"}
    for key, label in labels.items():
        mean, std = summary["mean"][key], summary["std"][key]
        per_fold = ", ".join(f"{fold[key]['macro_f1']:.3f}" for fold in summary["folds"])
        rows.append(f"| {label} | {mean['accuracy']:.4f} ± {std['accuracy']:.4f} | "
                    f"{mean['macro_f1']:.4f} ± {std['macro_f1']:.4f} | {per_fold} |")
    names = list(summary["folds"][0]["model"].get("per_class_f1", {}))
    if names:
        counts = summary.get("class_counts", {})
        rows += ["", "Per-class F1, mean over the folds (cells in the data set):", "",
                 "| class | cells | " + " | ".join(labels.values()) + " |", "|---|---:|---:|---:|"]
        for name in names:
            means = [np.mean([fold[key]["per_class_f1"][name] for fold in summary["folds"]]) for key in labels]
            rows.append(f"| {name} | {counts.get(name, '')} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    rows.append("")
    rows.append(f"Wall time {summary['wall_seconds'] / 60:.1f} min; flags: {' '.join(summary['finetune_args']) or 'defaults'}.")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()

"""Novel cell type detection, leave one type out: fine-tune without a type, then ask whether its cells get flagged.

    python -m benchmarks.novelty                                  # Baron mouse pancreas and pbmc68k_reduced
    python -m benchmarks.novelty --datasets pbmc68k_reduced --types Dendritic -- --num_epochs 4

For each data set and each held-out type: `python -m train.finetune` (its own process, the defaults unless flags
follow `--`) on every cell of the other types, which fits the open-set detector (train/novelty.py: thresholds on its
validation cells); then the saved folder scores the known test cells of that run and every cell of the held-out type.
With `--refit_detector` the runs already fine-tuned keep their models, and each detector is fitted anew from the
folder on the run's own training and validation cells, as fine-tuning fits it (to measure a changed
train/novelty.py without fine-tuning again). Per score: AUROC of novel vs known test cells, the share of novel
cells flagged and of known cells wrongly flagged at the folder's saved threshold (each combination also behind the
saved gate, `<name>_gated`: how `scbert annotate` flags), and the known cells' macro-F1 without and with flagging
(a flagged known cell counts as wrong). scBERT's rule (top probability < 0.5 -> unassigned) is scored the same way. Writes
benchmarks/results/novelty/novelty.json and novelty.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.annotation_cv import BARON, write_bundled_dataset
from benchmarks.measure import machine_info
from train.novelty import COMBINED_SCORES, flag_novel

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {"baron_mouse_pancreas": (str(BARON), "cell_type1"), "pbmc68k_reduced": (None, "bulk_labels")}
SCORES = ("max_probability", "energy", "prototype_distance", "mahalanobis", "expression_knn", "class_scaled_knn",
          *COMBINED_SCORES)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--types", nargs="+", default=None, help="held-out types (default: every type)")
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "novelty"))
    parser.add_argument("--results_dir", default=str(ROOT / "benchmarks" / "results" / "novelty"))
    parser.add_argument("--refit_detector", action="store_true",
                        help="fit each run's detector anew from its folder and split (train/novelty.py as it is now)")
    parser.add_argument("finetune_args", nargs=argparse.REMAINDER, help="after '--': train.finetune flags")
    return parser.parse_args(argv)


def load_dataset(name: str, output_dir: Path):
    import anndata

    path, label_key = DATASETS[name]
    path = path or write_bundled_dataset(name, output_dir)
    adata = anndata.read_h5ad(path)
    adata.obs[label_key] = adata.obs[label_key].astype(str)
    return adata, label_key


def held_out_run(adata, label_key: str, novel_type: str, folder: Path, extra: list[str], refit: bool = False) -> dict:
    """Fine-tunes on the other types (skipped when the run's results exist) and scores its folder."""
    known = adata[adata.obs[label_key] != novel_type].copy()
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "run" / "results.json").exists():
        known.write_h5ad(folder / "known.h5ad")
        command = [sys.executable, "-m", "train.finetune", "--data", str(folder / "known.h5ad"), "--label_key",
                   label_key, "--output_dir", str(folder / "run"), "--no_progress_bar", "--no_baseline", *extra]
        print("$ " + " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    split = json.loads((folder / "run" / "split.json").read_text())
    training = known[split["train"]], known[split["validation"]]
    return score_folder(folder / "run" / "model", known[split["test"]], adata[adata.obs[label_key] == novel_type],
                        label_key, novel_type, refit_on=training if refit else None)


def refit_detector(model, tokenizer, train, validation, label_key: str, false_flag_rate: float):
    """The detector fine-tuning would fit for this model now: statistics from ``train``, thresholds on ``validation``."""
    from train.annotate import run_model
    from train.novelty import fit_novelty_detector, model_expression_genes

    outputs = {}
    for part, cells in (("train", train), ("validation", validation)):
        expression = tokenizer.encode_matrix(cells)
        logits, embeddings = run_model(model, tokenizer, expression, 64)
        outputs[part] = {"logits": logits, "embeddings": embeddings, "expression": expression,
                         "labels": np.array([model.config.label2id[t] for t in cells.obs[label_key]])}
    return fit_novelty_detector(outputs["train"], outputs["validation"], model.config.num_labels, false_flag_rate,
                                expression_genes=model_expression_genes(tokenizer))


def score_folder(model_folder: Path, known, novel, label_key: str, novel_type: str, refit_on=None) -> dict:
    from sklearn.metrics import f1_score, roc_auc_score

    from train.annotate import load_classifier, run_model
    from train.novelty import load_detector, novelty_scores

    model, tokenizer = load_classifier(model_folder, "cpu")
    detector, statistics = load_detector(model.config, model_folder)
    if refit_on is not None:
        detector, statistics = refit_detector(model, tokenizer, *refit_on, label_key, detector["false_flag_rate"])
    label2id = model.config.label2id
    outputs = {}
    for part, cells in (("known", known), ("novel", novel)):
        expression = tokenizer.encode_matrix(cells)
        logits, embeddings = run_model(model, tokenizer, expression, 64)
        outputs[part] = {"logits": logits, "scores": novelty_scores(logits, embeddings, statistics, expression)}
    truth = np.array([label2id[t] for t in known.obs[label_key]])
    predicted = outputs["known"]["logits"].argmax(-1)
    classes = np.unique(truth)

    def known_macro_f1(flagged: np.ndarray) -> float:
        return float(f1_score(truth, np.where(flagged, -1, predicted), labels=classes, average="macro", zero_division=0))

    result = {"novel_type": novel_type, "novel_cells": int(novel.n_obs), "known_test_cells": int(known.n_obs),
              "detector_score": detector["score"], "false_flag_rate": detector.get("false_flag_rate"),
              "known_macro_f1": known_macro_f1(np.zeros(len(truth), dtype=bool)), "scores": {}}
    for rule, settings in decision_rules(detector).items():
        score = settings["score"]
        known_scores, novel_scores = outputs["known"]["scores"][score], outputs["novel"]["scores"][score]
        flagged = {part: flag_novel(outputs[part]["scores"], settings) for part in ("known", "novel")}
        result["scores"][rule] = {
            "auroc": float(roc_auc_score(np.r_[np.zeros(len(known_scores)), np.ones(len(novel_scores))],
                                         np.r_[known_scores, novel_scores])),
            "threshold": float(settings["thresholds"][score]),
            "novel_flagged": float(np.mean(flagged["novel"])),
            "known_flagged": float(np.mean(flagged["known"])),
            "known_macro_f1_with_flagging": known_macro_f1(flagged["known"]),
        }
    return result


def decision_rules(detector: dict) -> dict[str, dict]:
    """Rule name -> detector settings (`flag_novel`): each score at its saved threshold, each combination also
    behind the saved gate (`<name>_gated`), and scBERT's rule (top probability < 0.5)."""
    thresholds = detector["thresholds"]
    rules = {name: {"score": name, "thresholds": thresholds} for name in SCORES if name in thresholds}
    if detector.get("gate"):
        rules.update({f"{name}_gated": {"score": name, "thresholds": thresholds, "gate": detector["gate"]}
                      for name in COMBINED_SCORES if name in thresholds})
    rules["scbert_rule"] = {"score": "max_probability", "thresholds": {"max_probability": 0.5}}
    return rules


def summarise(runs: list[dict]) -> dict:
    rules = list(runs[0]["scores"])
    summary = {"known_macro_f1": float(np.mean([r["known_macro_f1"] for r in runs]))}
    for rule in rules:
        summary[rule] = {key: float(np.mean([r["scores"][rule][key] for r in runs]))
                         for key in ("auroc", "novel_flagged", "known_flagged", "known_macro_f1_with_flagging")}
        summary[rule]["known_macro_f1_drop"] = summary["known_macro_f1"] - summary[rule]["known_macro_f1_with_flagging"]
    return summary


def render(results: dict) -> str:
    names = {"scbert_rule": "scBERT's rule (top probability < 0.5)", "max_probability": "1 - top probability",
             "energy": "energy (-logsumexp logits)", "prototype_distance": "cosine distance to nearest class mean",
             "mahalanobis": "Mahalanobis distance to nearest class mean",
             "expression_knn": "distance to 5th nearest training cell, expression PCA",
             "class_scaled_knn": "the same, divided by the predicted type's median",
             "combined": "mean of class-scaled kNN and Mahalanobis, standardised",
             "combined_max": "max of class-scaled kNN and Mahalanobis, standardised",
             "knn_energy": "mean of class-scaled kNN and energy, standardised",
             "knn_mahalanobis_energy": "mean of class-scaled kNN, Mahalanobis and energy, standardised"}
    lines = []
    for dataset, block in results["datasets"].items():
        summary = block["summary"]
        lines += [f"### {dataset}: leave one type out ({len(block['runs'])} types), mean over held-out types", "",
                  f"Known-cell macro-F1 without flagging: {summary['known_macro_f1']:.3f}.", "",
                  "| score (threshold) | AUROC | novel flagged | known flagged | known macro-F1 with flagging (change) |",
                  "|---|---:|---:|---:|---:|"]
        for rule in ("scbert_rule", *SCORES, *(f"{name}_gated" for name in COMBINED_SCORES)):
            if rule not in summary:
                continue
            s = summary[rule]
            threshold = "fixed 0.5" if rule == "scbert_rule" else "saved, validation"
            name = names[rule] if rule in names else names[rule.removesuffix("_gated")] + ", behind the gate"
            lines.append(f"| {name} ({threshold}) | {s['auroc']:.3f} | {s['novel_flagged']:.1%} | "
                         f"{s['known_flagged']:.1%} | {s['known_macro_f1_with_flagging']:.3f} "
                         f"({-100 * s['known_macro_f1_drop']:+.1f} pt) |")
        lines += ["", "Per held-out type, AUROC of each score:", "",
                  "| held-out type | cells | " + " | ".join(SCORES) + " | scBERT rule: novel flagged |",
                  "|---|---:|" + "---:|" * (len(SCORES) + 1)]
        for run in block["runs"]:
            lines.append(f"| {run['novel_type']} | {run['novel_cells']} | "
                         + " | ".join(f"{run['scores'][s]['auroc']:.3f}" if s in run["scores"] else "" for s in SCORES)
                         + f" | {run['scores']['scbert_rule']['novel_flagged']:.1%} |")
        if block["not_held_out"]:
            lines += ["", f"Not held out (not run): {', '.join(block['not_held_out'])}."]
        lines += ["", f"Wall time {block['wall_seconds'] / 60:.1f} min; fine-tuning flags: "
                      f"{' '.join(block['finetune_args']) or 'defaults'}.", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    extra = [a for a in args.finetune_args if a != "--"]
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    # One data set per invocation is fine: the others' results already in novelty.json are kept.
    existing = results_dir / "novelty.json"
    results = json.loads(existing.read_text()) if existing.exists() else {"datasets": {}}
    results.update({"finetune_args": extra, "machine": machine_info()})
    for name in args.datasets:
        start = time.perf_counter()
        adata, label_key = load_dataset(name, Path(args.output_dir))
        present = sorted(adata.obs[label_key].unique())
        types = [t for t in args.types if t in present] if args.types else present
        if not types:
            print(f"{name}: none of --types {args.types} is a type of this data set; skipped.", flush=True)
            continue
        runs = [held_out_run(adata, label_key, novel_type, Path(args.output_dir) / name / safe(novel_type), extra,
                             args.refit_detector) for novel_type in types]
        results["datasets"][name] = {"label_key": label_key, "finetune_args": extra, "runs": runs,
                                     "not_held_out": [t for t in present if t not in types],
                                     "summary": summarise(runs), "wall_seconds": time.perf_counter() - start}
        (results_dir / "novelty.json").write_text(json.dumps(results, indent=2))
        (results_dir / "novelty.md").write_text(render(results))
    print(render(results))
    return results


def safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


if __name__ == "__main__":
    main()

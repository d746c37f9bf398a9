"""Drug combination synergy on O'Neil 2016: scBERT 2.0 cell-line embeddings against DeepSynergy-style and one-hot
baselines, on the same folds.

    python -m benchmarks.synergy                                  # both splits, 5 folds each (~40 min on 2 cores)
    python -m benchmarks.synergy --splits random --folds 0 -- --num_epochs 5

Splits (train.synergy.split_rows): the data's random `fold` column, and leave cell lines out (35 lines shuffled into
5 groups of 7; validation lines from the rest). Models, each trained on the fold's training rows with early stopping
on the same validation rows:
- `scbert2_pretrained`: `scbert synergy train` on checkpoints/scbert2-small (frozen encoder), flags after `--` added;
- `scbert2_scratch`: the same with a randomly initialised encoder (`--from_scratch`): what pretraining adds;
- `deepsynergy_mlp`: DeepSynergy-style MLP (Preuer et al. 2018) on the raw expression of all 2,401 genes and the same
  drug features (Morgan bits + target multi-hot) of A and B, trained on both orders and averaged over both at
  prediction, features normalised as DeepSynergy does (standardise, tanh, standardise); narrower than its 8192-4096
  layers (512-256) for this CPU;
- `one_hot_mlp`: drug identities (one-hot of A plus one-hot of B) and cell-line identity only (SynVerse's baseline).
Metrics per test fold: Pearson, Spearman, RMSE; mean and standard deviation over folds. Writes
benchmarks/results/synergy/synergy.json, synergy.md and synergy.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from train.synergy import read_oneil, regression_metrics, split_rows, morgan_fingerprints

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "synergy" / "oneil_transynergy"
CHECKPOINT = ROOT / "checkpoints" / "scbert2-small"
MODELS = ("scbert2_pretrained", "scbert2_scratch", "deepsynergy_mlp", "one_hot_mlp")
SPLITS = ("random", "cell_line")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--model", default=str(CHECKPOINT))
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--folds", nargs="+", type=int, default=list(range(5)))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--baseline_epochs", type=int, default=100)
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "synergy"))
    parser.add_argument("--results_dir", default=str(ROOT / "benchmarks" / "results" / "synergy"))
    parser.add_argument("synergy_args", nargs=argparse.REMAINDER, help="after '--': `scbert synergy train` flags")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- baselines
class FeatureMLP(nn.Module):
    def __init__(self, num_features: int, hidden: tuple[int, ...], input_dropout: float, dropout: float):
        super().__init__()
        layers, width = [nn.Dropout(input_dropout)], num_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        self.layers = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)  # [B, 1] -> [B]


def standardiser(train: np.ndarray):
    """z-scores with the training rows' statistics; a column constant in training (e.g. a held-out cell line's
    one-hot column) is only centred."""
    centre, scale = train.mean(0), train.std(0)
    scale[scale < 1e-6] = 1.0
    return lambda x: (x - centre) / scale


def fit_mlp(views: list[np.ndarray], y: np.ndarray, split: dict[str, np.ndarray], hidden: tuple[int, ...],
            input_dropout: float, dropout: float, tanh_norm: bool, epochs: int, patience: int = 10,
            seed: int = 42) -> np.ndarray:
    """Trains on every view (feature matrix) of the training rows, early-stops on the validation RMSE of the views'
    mean prediction, and returns that mean prediction for the test rows. Features standardised on the training rows;
    with `tanh_norm`, DeepSynergy's normalisation (standardise, tanh, standardise again), which keeps the features of
    an unseen cell line from landing far outside the training range."""
    torch.manual_seed(seed)
    train = np.concatenate([view[split["train"]] for view in views])
    normalise = standardiser(train)
    if tanh_norm:
        first, second = normalise, standardiser(np.tanh(normalise(train)))
        normalise = lambda x: second(np.tanh(first(x)))  # noqa: E731
    tensors = {part: [torch.from_numpy(normalise(view[rows]).astype(np.float32)) for view in views]
               for part, rows in split.items()}
    y_mean, y_std = y[split["train"]].mean(), y[split["train"]].std()
    targets = torch.from_numpy(np.tile((y[split["train"]] - y_mean) / y_std, len(views)).astype(np.float32))
    train_x = torch.cat(tensors["train"])
    model = FeatureMLP(train.shape[1], hidden, input_dropout, dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)

    def predict(part: str) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            mean = torch.stack([model(view) for view in tensors[part]]).mean(0).numpy()
        model.train()
        return mean * y_std + y_mean

    best, best_state, stale = np.inf, None, 0
    for _ in range(epochs):
        for batch in torch.randperm(len(train_x), generator=generator).split(256):
            loss = nn.functional.mse_loss(model(train_x[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rmse = float(np.sqrt(np.mean((predict("validation") - y[split["validation"]]) ** 2)))
        if rmse < best:
            best, best_state, stale = rmse, {k: v.clone() for k, v in model.state_dict().items()}, 0
        else:
            stale += 1
            if stale >= patience:
                break
    model.load_state_dict(best_state)
    return predict("test")


def baseline_views(name: str, scores: pd.DataFrame, drugs: pd.DataFrame, cell_lines: pd.DataFrame) -> list[np.ndarray]:
    """The baseline's feature matrices, one per drug order (a model that is not symmetric sees both)."""
    drug_row = {drug: i for i, drug in enumerate(drugs["name"])}
    a = scores["drug_a"].map(drug_row).to_numpy()
    b = scores["drug_b"].map(drug_row).to_numpy()
    line = scores["cell_line"].map({cl: i for i, cl in enumerate(cell_lines.index)}).to_numpy()
    if name == "one_hot_mlp":
        eye_drug, eye_line = np.eye(len(drugs), dtype=np.float32), np.eye(len(cell_lines), dtype=np.float32)
        return [np.concatenate([eye_drug[a] + eye_drug[b], eye_line[line]], axis=1)]  # symmetric: one view
    targets = sorted({gene for text in drugs["targets"] for gene in text.split(";") if gene})
    multi_hot = np.array([[gene in text.split(";") for gene in targets] for text in drugs["targets"]], np.float32)
    drug_features = np.concatenate([morgan_fingerprints(drugs, 1024, 2), multi_hot], axis=1)
    expression = cell_lines.to_numpy(dtype=np.float32)[line]
    return [np.concatenate([drug_features[a], drug_features[b], expression], axis=1),
            np.concatenate([drug_features[b], drug_features[a], expression], axis=1)]


BASELINES = {"deepsynergy_mlp": {"hidden": (512, 256), "input_dropout": 0.2, "dropout": 0.5, "tanh_norm": True},
             "one_hot_mlp": {"hidden": (512, 256), "input_dropout": 0.0, "dropout": 0.2, "tanh_norm": False}}


def baseline_run(args, views, y: np.ndarray, split: dict, split_name: str, fold: int, model: str) -> np.ndarray:
    """A baseline's test predictions, saved beside the scBERT runs (and read back when they exist)."""
    path = Path(args.output_dir) / f"{split_name}_fold{fold}_{model}.npy"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, fit_mlp(views, y, split, epochs=args.baseline_epochs, seed=fold, **BASELINES[model]))
    return np.load(path)


# ---------------------------------------------------------------------------------------------------- scBERT
def scbert_run(args, split: str, fold: int, scratch: bool) -> np.ndarray:
    """`scbert synergy train` in its own process (skipped when its predictions exist); the test predictions."""
    folder = Path(args.output_dir) / f"{split}_fold{fold}_{'scratch' if scratch else 'pretrained'}"
    if not (folder / "test_predictions.csv").exists():
        command = [sys.executable, "-m", "train.synergy", "train", "--data", args.data, "--model", args.model,
                   "--output_dir", str(folder), "--split", split, "--test_fold", str(fold), "--no_progress_bar",
                   *(["--from_scratch"] if scratch else []), *[a for a in args.synergy_args if a != "--"]]
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "log.txt", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return pd.read_csv(folder / "test_predictions.csv")["predicted_synergy"].to_numpy()


# ---------------------------------------------------------------------------------------------------- report
def summarise(runs: list[dict]) -> dict:
    table = {}
    for run in runs:
        table.setdefault(run["split"], {}).setdefault(run["model"], []).append(run["metrics"])
    return {split: {model: {metric: {"mean": float(np.mean([f[metric] for f in folds])),
                                     "std": float(np.std([f[metric] for f in folds])), "folds": len(folds)}
                            for metric in ("pearson", "spearman", "rmse")}
                    for model, folds in models.items()}
            for split, models in table.items()}


def render(results: dict) -> str:
    lines = ["| split | model | Pearson | Spearman | RMSE | folds |", "|---|---|---|---|---|---|"]
    for split, models in results["summary"].items():
        for model, metrics in models.items():
            cells = [f"{metrics[m]['mean']:.3f} ± {metrics[m]['std']:.3f}" for m in ("pearson", "spearman", "rmse")]
            lines.append(f"| {split} | {model} | {' | '.join(cells)} | {metrics['pearson']['folds']} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(summary)
    figure, axes = plt.subplots(1, len(splits) + 1, figsize=(5 * (len(splits) + 1), 4.5))
    for axis, split in zip(axes, splits):
        chosen = [r for r in runs if r["split"] == split and r["model"] == "scbert2_pretrained"]
        if chosen:
            observed = np.concatenate([r["observed"] for r in chosen])
            predicted = np.concatenate([r["predicted"] for r in chosen])
            axis.scatter(observed, predicted, s=2, alpha=0.3)
            axis.set_title(f"scbert2_pretrained, {split} split (all test folds)")
            axis.set_xlabel("observed Loewe synergy")
            axis.set_ylabel("predicted")
    models = sorted({m for split in splits for m in summary[split]})
    width = 0.8 / len(splits)
    for i, split in enumerate(splits):
        means = [summary[split].get(m, {}).get("pearson", {}).get("mean", np.nan) for m in models]
        stds = [summary[split].get(m, {}).get("pearson", {}).get("std", 0.0) for m in models]
        axes[-1].bar(np.arange(len(models)) + i * width, means, width, yerr=stds, label=split)
    axes[-1].set_xticks(np.arange(len(models)) + width * (len(splits) - 1) / 2, models, rotation=20)
    axes[-1].set_ylabel("test Pearson (mean ± sd over folds)")
    axes[-1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> dict:
    args = parse_args(argv)
    scores, drugs, cell_lines = read_oneil(args.data)
    y = scores["synergy"].to_numpy(dtype=np.float64)
    runs, start = [], time.perf_counter()
    views = {name: baseline_views(name, scores, drugs, cell_lines) for name in BASELINES if name in args.models}
    for fold in args.folds:  # fold-major, so that a run cut short has both splits
        for split_name in args.splits:
            split = split_rows(scores, split_name, fold, seed=0)
            for model in args.models:
                began = time.perf_counter()
                if model in BASELINES:
                    predicted = baseline_run(args, views[model], y, split, split_name, fold, model)
                else:
                    predicted = scbert_run(args, split_name, fold, scratch=model == "scbert2_scratch")
                observed = y[split["test"]]
                runs.append({"split": split_name, "fold": fold, "model": model, "seconds": time.perf_counter() - began,
                             "metrics": regression_metrics(observed, predicted),
                             "observed": observed, "predicted": predicted})
                print(f"{split_name} fold {fold} {model}: " + json.dumps(runs[-1]["metrics"]), flush=True)
            results = write_results(args, runs, time.perf_counter() - start)  # after every split: partial results
    print(render(results))
    return results


def write_results(args, runs: list[dict], seconds: float) -> dict:
    summary = summarise(runs)
    results = {"data": str(args.data), "checkpoint": str(args.model), "synergy_args": args.synergy_args,
               "baselines": BASELINES, "machine": platform.platform(), "seconds": seconds, "summary": summary,
               "runs": [{k: v for k, v in run.items() if k not in ("observed", "predicted")} for run in runs]}
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "synergy.json").write_text(json.dumps(results, indent=2))
    (out / "synergy.md").write_text(render(results))
    plot(runs, summary, out / "synergy.png")
    return results


if __name__ == "__main__":
    main()

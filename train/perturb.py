"""Perturb-seq effect prediction: `scbert perturb train|predict`.

    scbert perturb train --data ../shared/data/perturbseq/papalexi2021_thp1_lowmoi.h5ad \\
        --model checkpoints/scbert2-small --output_dir runs/perturb --test_fold 0
    scbert perturb predict --model runs/perturb/model --data controls.h5ad --perturbations STAT1 IRF7 \\
        --output predicted.h5ad

`ScBert2ForPerturbationPrediction` reads a control cell through the pretrained encoder (frozen, as for synergy) and a
knock-out as the target's gene token, and predicts the cell's expression of every measured gene after the knock-out.
Training pairs every control cell with every training perturbation, the label being that perturbation's mean profile
(log2 normalised, as the tokenizer computes it), and stops early on held-out validation perturbations. `--test_fold K`
holds out one of 5 groups of perturbations entirely (no cell of a test target is seen in training) and scores the
model next to three baselines on the same split (Ahlmann-Eltze, Huber & Anders 2025): no change (the control mean),
mean shift (control mean + the average training effect) and a ridge regression from the target's pretrained
gene-table embedding to its effect. Metrics as GEARS defines them (`effect_metrics`). OUTPUT_DIR/model is the folder;
OUTPUT_DIR/results.json the scores per test perturbation.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from accelerate.utils import set_seed
from scipy import stats
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from modeling_scbert import ScBert2ForPerturbationPrediction
from tokenization import GeneExpressionTokenizer
from train.cli import run_command, run_subcommand
from train.data import read_h5ad
from train.loop import EarlyStopping, add_training_arguments, make_accelerator, train_loop
from train.models import embed_cells, frozen_encoder_head, load_pretrained_folder, save_model_folder

NUM_FOLDS = 5
TOP_DE_GENES = 20
# Chosen on fold 0's validation perturbations: lr 1e-4 (validation top-20 DE MSE 0.203 after one pass over every
# pair) over 1e-3 (0.216); both were best after that first pass (0.176 after 20 steps), hence short epochs.
DEFAULTS = {"num_epochs": 40, "learning_rate": 1e-4, "per_device_batch_size": 256, "warmup_ratio": 0.02}


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class PerturbSeq:
    """A screen's cells on the genes the model reads: log2 normalised expression of the measured genes that are in
    the vocabulary, each cell's perturbation, and the control label."""

    adata: ad.AnnData  # the cells as read (raw counts or log-normalised)
    expression: np.ndarray  # [cells, panel genes], log2 normalised
    genes: list[str]  # the panel, in the vocabulary's spelling
    gene_ids: np.ndarray  # [panel genes] token ids
    perturbation: np.ndarray  # [cells] target gene or the control label
    control: str

    @property
    def targets(self) -> list[str]:
        return sorted(set(self.perturbation) - {self.control})

    def mean_profile(self, label: str) -> np.ndarray:
        return self.expression[self.perturbation == label].mean(axis=0)


def check_perturbations(adata: ad.AnnData, perturbation_key: str, control: str) -> np.ndarray:
    if perturbation_key not in adata.obs.columns:
        raise ValueError(f"obs has no column {perturbation_key!r} (columns: {list(adata.obs.columns)}); pass the column "
                         "naming each cell's perturbation with --perturbation_key.")
    labels = adata.obs[perturbation_key].astype(str).to_numpy()
    if control not in set(labels):
        raise ValueError(f"No control cells: obs[{perturbation_key!r}] has no cell labelled {control!r} (labels: "
                         f"{sorted(set(labels))[:8]} ...); pass the control label with --control.")
    return labels


def panel_expression(adata: ad.AnnData, tokenizer: GeneExpressionTokenizer, genes: list[str] | None = None):
    """[cells, genes] log2 normalised expression and token ids of the data's vocabulary genes (or of `genes`, which
    must all be measured in the data: an unmeasured gene is not an observed zero)."""
    expression = sp.csr_matrix(tokenizer.encode_matrix(adata))  # [cells, vocabulary genes]
    index, _ = tokenizer.match_genes(list(adata.var_names))
    measured = np.unique(index[index >= 0])
    if genes is None:
        columns = measured
    else:
        columns = tokenizer.gene_token_ids(genes) - tokenizer.num_special_tokens
        measured_columns = set(measured.tolist())
        missing = [gene for gene, column in zip(genes, columns) if column not in measured_columns]
        if missing:
            raise ValueError(f"{len(missing)} of the model's {len(genes)} genes are not measured in the data: "
                             f"{missing[:8]}{' ...' if len(missing) > 8 else ''}. The model predicts from a cell's "
                             "expression of all of them.")
    return expression[:, columns].toarray().astype(np.float32), columns + tokenizer.num_special_tokens


def load_screen(path: str | Path, tokenizer: GeneExpressionTokenizer, perturbation_key: str, control: str) -> PerturbSeq:
    adata = read_h5ad(path)
    labels = check_perturbations(adata, perturbation_key, control)
    expression, gene_ids = panel_expression(adata, tokenizer)
    return PerturbSeq(adata, expression, tokenizer.convert_ids_to_tokens(gene_ids.tolist()), gene_ids, labels, control)


def target_token_ids(targets: list[str], tokenizer: GeneExpressionTokenizer) -> np.ndarray:
    ids = tokenizer.gene_token_ids(targets)
    outside = [t for t, i in zip(targets, ids) if i < 0]
    if outside:
        raise ValueError(f"Perturbation targets not in the model's vocabulary: {outside}. A knock-out is read as its "
                         "target's gene token, so the target must be a vocabulary gene (a symbol or Ensembl id).")
    return ids


def fold_targets(targets: list[str], seed: int = 0) -> list[list[str]]:
    """The targets shuffled into NUM_FOLDS groups: fold k's test perturbations."""
    order = np.random.default_rng(seed).permutation(sorted(targets))
    return [sorted(group.tolist()) for group in np.array_split(order, NUM_FOLDS)]


# ---------------------------------------------------------------------------------------------------- metrics
def top_de_genes(screen: PerturbSeq, targets: list[str], n: int = TOP_DE_GENES) -> dict[str, np.ndarray]:
    """Each target's top-n differentially expressed panel genes against the controls (scanpy's t-test, by absolute
    score as GEARS ranks them: down- and up-regulated alike), as column indices."""
    import scanpy as sc

    keep = np.isin(screen.perturbation, [*targets, screen.control])
    cells = ad.AnnData(screen.expression[keep], obs=pd.DataFrame({"group": screen.perturbation[keep]}).astype("category"))
    cells.var_names = [f"g{i}" for i in range(cells.n_vars)]
    sc.tl.rank_genes_groups(cells, "group", groups=targets, reference=screen.control, method="t-test", n_genes=n,
                            rankby_abs=True)
    names = cells.uns["rank_genes_groups"]["names"]
    return {t: np.array([int(name[1:]) for name in names[t]]) for t in targets}


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r, or None where one side is constant (e.g. the deltas of "no change")."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(stats.pearsonr(x, y)[0])


def effect_metrics(predicted: np.ndarray, observed: np.ndarray, control: np.ndarray, de: np.ndarray) -> dict:
    """GEARS's metrics of a predicted mean profile: MSE and Pearson of the profile, Pearson of the deltas
    (minus the control mean), the same on the top DE genes, and the share of those changed in the right direction."""
    predicted_delta, observed_delta = predicted - control, observed - control
    return {"mse": float(np.mean((predicted - observed) ** 2)), "pearson": pearson(predicted, observed),
            "pearson_delta": pearson(predicted_delta, observed_delta),
            "mse_top20_de": float(np.mean((predicted[de] - observed[de]) ** 2)),
            "pearson_delta_top20_de": pearson(predicted_delta[de], observed_delta[de]),
            "direction_top20_de": None if not predicted_delta[de].any()  # "no change" has no direction
            else float(np.mean(np.sign(predicted_delta[de]) == np.sign(observed_delta[de])))}


def baseline_profiles(screen: PerturbSeq, train_targets: list[str], test_targets: list[str],
                      gene_table: np.ndarray, target_ids: dict[str, int]) -> dict[str, dict[str, np.ndarray]]:
    """Mean profiles of the test targets by the three baselines, fitted on the training targets only."""
    from sklearn.linear_model import RidgeCV

    control = screen.mean_profile(screen.control)
    effects = np.stack([screen.mean_profile(t) - control for t in train_targets])  # [train targets, genes]
    ridge = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(gene_table[[target_ids[t] for t in train_targets]], effects)
    linear = ridge.predict(gene_table[[target_ids[t] for t in test_targets]])
    return {"no_change": {t: control for t in test_targets},
            "mean_shift": {t: control + effects.mean(axis=0) for t in test_targets},
            "linear_gene_table": {t: control + linear[i] for i, t in enumerate(test_targets)}}


# ---------------------------------------------------------------------------------------------------- model
@torch.no_grad()
def predict_mean_profiles(model: ScBert2ForPerturbationPrediction, cell_embeddings: torch.Tensor,
                          control_expression: torch.Tensor, perturbation_ids: list[int],
                          batch_size: int = 1024) -> np.ndarray:
    """[perturbations, genes]: each perturbation's predicted profile averaged over all the control cells."""
    was_training = model.training
    model.eval()
    profiles = []
    for target in perturbation_ids:
        total = torch.zeros(control_expression.shape[1])
        for start in range(0, len(cell_embeddings), batch_size):
            chunk = slice(start, start + batch_size)
            ids = torch.full((len(cell_embeddings[chunk]),), target, dtype=torch.long)
            total += model(ids, control_expression[chunk], cell_embeddings=cell_embeddings[chunk]).predictions.sum(0)
        profiles.append((total / len(cell_embeddings)).numpy())
    model.train(was_training)
    return np.stack(profiles)


class PairCollator:
    """(control cell, training perturbation) index pairs -> model inputs. The label is the control cell moved by the
    perturbation's mean effect (its mean profile minus the control mean): cells are not paired in a screen, and the
    mean profile itself as label would ask the model to predict each control cell's own noise away."""

    def __init__(self, cell_embeddings, control_expression, perturbation_ids, mean_effects):
        self.cell_embeddings, self.control_expression = cell_embeddings, control_expression
        self.perturbation_ids, self.mean_effects = perturbation_ids, mean_effects

    def __call__(self, items):
        cells, perturbations = torch.stack([item[0] for item in items]).unbind(dim=1)
        control = self.control_expression[cells]
        return {"perturbation_ids": self.perturbation_ids[perturbations], "cell_embeddings": self.cell_embeddings[cells],
                "control_expression": control, "labels": control + self.mean_effects[perturbations]}


def build_model(args, config, gene_ids: np.ndarray) -> ScBert2ForPerturbationPrediction:
    """The perturbation head predicting `gene_ids` on the encoder of `--model` (or a random one, `--from_scratch`)."""
    config.update({"perturbation_gene_ids": gene_ids.tolist(), "synergy_hidden_size": args.hidden_size,
                   "classifier_dropout": args.dropout})
    return frozen_encoder_head(ScBert2ForPerturbationPrediction, args.model, config, args.from_scratch)


# ---------------------------------------------------------------------------------------------------- train
def build_train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scbert perturb train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="an .h5ad Perturb-seq screen (raw counts or log-normalised)")
    parser.add_argument("--model", required=True, help="a pretrained scBERT 2.0 folder (e.g. checkpoints/scbert2-small)")
    parser.add_argument("--from_scratch", action="store_true", help="ablation: the same shape, randomly initialised")
    parser.add_argument("--perturbation_key", default="perturbation", help="obs column: each cell's target gene")
    parser.add_argument("--control", default="non-targeting", help="the label of the control cells")
    parser.add_argument("--test_fold", type=int, default=None, help=f"0-{NUM_FOLDS - 1}: hold out that group of "
                                                                    "perturbations; none: train on every one")
    parser.add_argument("--validation_targets", type=int, default=3, help="training perturbations held out for "
                                                                         "early stopping")
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--pairs_per_epoch", type=int, default=2048)
    add_training_arguments(parser)
    parser.set_defaults(**DEFAULTS, min_overlap=0.0)
    return parser


def split_targets(targets: list[str], test_fold: int | None, validation: int, seed: int) -> dict[str, list[str]]:
    test = fold_targets(targets)[test_fold] if test_fold is not None else []
    rest = [t for t in targets if t not in test]
    if len(rest) <= validation:
        raise ValueError(f"{len(rest)} training perturbations cannot spare {validation} for validation.")
    held = sorted(np.random.default_rng(seed).choice(rest, size=validation, replace=False).tolist())
    return {"train": [t for t in rest if t not in held], "validation": held, "test": test}


def train(argv=None) -> dict:
    args = build_train_parser().parse_args(argv)
    if args.test_fold is not None and not 0 <= args.test_fold < NUM_FOLDS:
        raise ValueError(f"--test_fold must be in 0..{NUM_FOLDS - 1}, got {args.test_fold}.")
    accelerator = make_accelerator(args, "perturb")
    set_seed(args.seed)
    config, tokenizer = load_pretrained_folder(args.model, expected_types=("scbert2",), min_overlap=args.min_overlap)
    screen = load_screen(args.data, tokenizer, args.perturbation_key, args.control)
    model = build_model(args, config, screen.gene_ids)
    target_ids = dict(zip(screen.targets, target_token_ids(screen.targets, tokenizer).tolist()))
    split = split_targets(screen.targets, args.test_fold, args.validation_targets, args.seed)
    controls = screen.perturbation == screen.control
    cell_embeddings = embed_cells(model, tokenizer, screen.adata[controls])
    control_expression = torch.from_numpy(screen.expression[controls])
    train_ids = torch.tensor([target_ids[t] for t in split["train"]])
    control_mean = screen.mean_profile(screen.control)
    effects = torch.from_numpy(np.stack([screen.mean_profile(t) - control_mean for t in split["train"]]))
    with torch.no_grad():  # start exactly at the mean-shift baseline; the head learns each target's departure from it
        model.output_bias.copy_(effects.mean(dim=0))
        model.output_gene_proj.weight.zero_()
        model.output_gene_proj.bias.zero_()
    pairs = torch.cartesian_prod(torch.arange(int(controls.sum())), torch.arange(len(split["train"])))
    # An "epoch" is --pairs_per_epoch pairs drawn from all (control cell, training perturbation) pairs: the head
    # overfits within one pass over all of them, so validation comes often.
    sampler = RandomSampler(pairs, num_samples=args.pairs_per_epoch, generator=torch.Generator().manual_seed(args.seed))
    loader = DataLoader(TensorDataset(pairs), batch_size=args.per_device_batch_size, sampler=sampler,
                        collate_fn=PairCollator(cell_embeddings, control_expression, train_ids, effects))
    de = top_de_genes(screen, split["validation"] + split["test"])
    output = Path(args.output_dir) / "model"

    def score(model, targets: list[str]) -> dict[str, dict]:
        predicted = predict_mean_profiles(model, cell_embeddings, control_expression, [target_ids[t] for t in targets])
        return {t: effect_metrics(predicted[i], screen.mean_profile(t), control_mean, de[t]) for i, t in enumerate(targets)}

    def evaluate(model) -> dict[str, float]:
        scores = score(model, split["validation"])
        return {metric: float(np.mean([s[metric] for s in scores.values() if s[metric] is not None]))
                for metric in ("mse", "pearson_delta", "mse_top20_de")}

    early_stopping = EarlyStopping("mse_top20_de", greater_is_better=False, patience=args.patience,
                                   on_new_best=lambda best: save_model_folder(best, tokenizer, output, accelerator))
    result = train_loop(accelerator, model, loader, args, evaluate=evaluate, early_stopping=early_stopping)
    best = ScBert2ForPerturbationPrediction.from_pretrained(output)
    results = {"data": str(args.data), "pretrained_from": None if args.from_scratch else args.model,
               "split": split, "test_fold": args.test_fold, "control_cells": int(controls.sum()),
               "panel_genes": len(screen.genes), "measured_targets": sorted(set(screen.targets) & set(screen.genes)),
               "training": {"seconds": result.seconds, "steps": result.step, "epoch_kept": result.best_epoch,
                            "best_validation_mse_top20_de": result.best_metric}}
    if split["test"]:
        gene_table = best.model.embeddings.gene_embeddings.weight.detach().numpy()
        baselines = baseline_profiles(screen, split["train"] + split["validation"], split["test"], gene_table, target_ids)
        predicted = predict_mean_profiles(best, cell_embeddings, control_expression, [target_ids[t] for t in split["test"]])
        profiles = {"model": dict(zip(split["test"], predicted)), **baselines,
                    "observed": {t: screen.mean_profile(t) for t in split["test"]}}
        results["test"] = {name: {t: effect_metrics(by_target[t], screen.mean_profile(t), control_mean, de[t])
                                  for t in split["test"]}
                           for name, by_target in profiles.items() if name != "observed"}
        write_profiles(profiles, control_mean, screen.genes, de, Path(args.output_dir) / "test_profiles.h5ad")
    if accelerator.is_main_process:
        (Path(args.output_dir) / "results.json").write_text(json.dumps(results, indent=2))
        print_summary(results, output)
    accelerator.end_training()
    return results


def write_profiles(profiles: dict[str, dict[str, np.ndarray]], control_mean: np.ndarray, genes: list[str],
                   de: dict[str, np.ndarray], path: Path) -> None:
    """The test perturbations' mean profiles, one row per (method, target), observed ones included; each target's
    top DE genes in uns."""
    rows = [(method, target, profile) for method, by_target in profiles.items() for target, profile in by_target.items()]
    table = ad.AnnData(np.stack([profile for *_, profile in rows]).astype(np.float32),
                       obs=pd.DataFrame({"method": [m for m, *_ in rows], "perturbation": [t for _, t, _ in rows]},
                                        index=[f"{m}:{t}" for m, t, _ in rows]),
                       var=pd.DataFrame(index=genes))
    table.varm["control_mean"] = control_mean.astype(np.float32)[:, None]
    table.uns["top20_de"] = {t: index.tolist() for t, index in de.items() if t in profiles["observed"]}
    table.write_h5ad(path)


def print_summary(results: dict, output: Path) -> None:
    for name, per_target in results.get("test", {}).items():
        means = {m: np.mean([s[m] for s in per_target.values() if s[m] is not None] or [np.nan])
                 for m in ("pearson_delta", "mse_top20_de", "direction_top20_de")}
        print(f"{name:>18}: " + ", ".join(f"{m} {v:.3f}" for m, v in means.items()))
    print(f"model in {output}")


# ---------------------------------------------------------------------------------------------------- predict
def build_predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scbert perturb predict",
                                     description="Predict the mean profile of knock-outs on your control cells.")
    parser.add_argument("--model", required=True, help="a folder written by `scbert perturb train` (RUN/model)")
    parser.add_argument("--data", required=True, help=".h5ad of control cells (or a screen: see --perturbation_key)")
    parser.add_argument("--perturbations", nargs="+", required=True, help="target genes to knock out")
    parser.add_argument("--output", required=True, help=".h5ad: one row per perturbation (and the control mean)")
    parser.add_argument("--perturbation_key", default=None, help="with --control: use only the control cells of a screen")
    parser.add_argument("--control", default="non-targeting")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--debug", action="store_true")
    return parser


def predict(argv=None) -> ad.AnnData:
    args = build_predict_parser().parse_args(argv)
    output = Path(args.output)
    if output.suffix != ".h5ad":
        raise ValueError(f"--output must be an .h5ad file, got {output}.")
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it.")
    config, tokenizer = load_pretrained_folder(args.model, expected_types=("scbert2",), min_overlap=0.0)
    if "ScBert2ForPerturbationPrediction" not in (config.architectures or []):
        raise ValueError(f"{args.model} holds a {config.architectures} model, not a perturbation head: train one with "
                         "`scbert perturb train`.")
    start = time.perf_counter()
    adata = read_h5ad(args.data)
    if args.perturbation_key is not None:
        adata = adata[check_perturbations(adata, args.perturbation_key, args.control) == args.control].copy()
    model = ScBert2ForPerturbationPrediction.from_pretrained(args.model)
    genes = tokenizer.convert_ids_to_tokens(list(config.perturbation_gene_ids))
    control_expression, _ = panel_expression(adata, tokenizer, genes)
    ids = target_token_ids(list(args.perturbations), tokenizer)
    profiles = predict_mean_profiles(model, embed_cells(model, tokenizer, adata), torch.from_numpy(control_expression),
                                     ids.tolist())
    control_mean = control_expression.mean(axis=0)
    result = ad.AnnData(np.vstack([control_mean, profiles]).astype(np.float32),
                        obs=pd.DataFrame({"perturbation": ["control (observed mean)", *args.perturbations]},
                                         index=["control", *args.perturbations]),
                        var=pd.DataFrame(index=genes))
    result.layers["delta"] = result.X - control_mean
    result.uns["scbert_perturb"] = {"model": str(args.model), "control_cells": int(adata.n_obs),
                                    "units": "log2(1 + counts per 10k)", "seconds": time.perf_counter() - start}
    result.write_h5ad(output)
    print(f"{len(args.perturbations)} perturbations predicted on {adata.n_obs} control cells -> {output}")
    return result


COMMANDS = {"train": train, "predict": predict}


def main(argv=None) -> None:
    run_subcommand("perturb", COMMANDS, __doc__, argv)


if __name__ == "__main__":
    run_command(main)

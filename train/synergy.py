"""Drug combination synergy from scBERT 2.0 cell-line embeddings: `scbert synergy train|predict`.

    scbert synergy train --data ../shared/data/synergy/oneil_transynergy --model checkpoints/scbert2-small \\
        --output_dir runs/synergy --split cell_line --test_fold 0
    scbert synergy predict --model runs/synergy/model --pairs pairs.csv --output predictions.csv

The cell line goes through the pretrained encoder once (frozen: 35 cell lines are far too few to fine-tune it), each
drug is its Morgan fingerprint (RDKit) plus its known target genes read from the encoder's gene table, and
`ScBert2ForDrugSynergy` regresses the Loewe synergy score, symmetric in the two drugs by construction. Training runs
in the family's Accelerate loop with early stopping on a validation split (random rows, or whole cell lines for
`--split cell_line`). OUTPUT_DIR/model holds the model, its tokenizer and the drug and cell-line tables it was
trained with (`drugs.csv`, `cell_lines.csv`), which `predict` uses unless given others in the same format.

Cell-line expression (CCLE) comes scaled per gene to [-1, 1] across the cell lines: not counts, and no longer
comparable between genes. It enters the tokenizer as `(x + 1) / 2 * CELL_LINE_VALUE_SCALE` in natural-log units,
so a gene at the bottom of its range is "not expressed" and the tokens kept (the tokenizer's `max_length` highest)
are the genes each line expresses most relative to the others: the part of the profile that tells lines apart.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from accelerate.utils import set_seed
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from modeling_scbert import ScBert2ForDrugSynergy
from tokenization import GeneExpressionTokenizer
from train.cli import run_command, run_subcommand
from train.loop import EarlyStopping, add_training_arguments, make_accelerator, train_loop
from train.models import embed_cells, frozen_encoder_head, load_pretrained_folder, save_model_folder

CELL_LINE_VALUE_SCALE = 4.0  # log1p of ~50 counts per 10k: a well-expressed gene in log-normalised units
SPLITS = ("random", "cell_line")
DRUGS_FILE, CELL_LINES_FILE = "drugs.csv", "cell_lines.csv"
# Chosen on the validation rows of random fold 0 (never on test rows), validation Pearson: raw embeddings 0.53 ->
# standardised 0.60; 100 epochs, 512 wide, 2 hidden layers, dropout 0.3: 0.77 (0.1: 0.72, 0.5: 0.73; lr 3e-3: 0.75).
DEFAULTS = {"num_epochs": 100, "learning_rate": 1e-3, "per_device_batch_size": 256, "warmup_ratio": 0.02}
PAIR_COLUMNS = ("drug_a", "drug_b", "cell_line")


# ---------------------------------------------------------------------------------------------------- tables
def read_oneil(data_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The O'Neil folder of ../shared/data/synergy: (scores, drugs, cell lines) in this module's formats."""
    data_dir = Path(data_dir)
    names = ["synergy_score.csv", "smiles_merck.csv", "expression_2401_genes_x_35_cell_lines.csv", "genes_2401_df.csv"]
    missing = [name for name in names if not (data_dir / name).exists()]
    if missing:
        raise FileNotFoundError(f"{data_dir} lacks {missing}: expected the O'Neil folder (see ../shared/data/README.md).")
    scores = pd.read_csv(data_dir / names[0], index_col=0).rename(
        columns={"drug_a_name": "drug_a", "drug_b_name": "drug_b"})
    merck = pd.read_csv(data_dir / names[1])
    targets = [sorted(set().union(*(ast.literal_eval(row[column]) for column in ("DrugBank", "Integrated")
                                    if isinstance(row[column], str))))
               for _, row in merck.iterrows()]
    drugs = pd.DataFrame({"name": merck["Name"], "smiles": merck["SMILE"], "targets": [";".join(t) for t in targets]})
    genes = pd.read_csv(data_dir / names[3])
    expression = pd.read_csv(data_dir / names[2])
    expression.index = genes["symbol"].astype(str)
    return scores, check_drugs(drugs), check_cell_lines(expression.T)


def check_drugs(drugs: pd.DataFrame) -> pd.DataFrame:
    """A drug table: one row per drug, columns name, smiles (may be empty: targets only), targets (';'-joined)."""
    missing = [column for column in ("name", "smiles", "targets") if column not in drugs.columns]
    if missing:
        raise ValueError(f"The drug table lacks the columns {missing}: expected name, smiles, targets "
                         "(targets as gene symbols joined by ';', either may be empty).")
    duplicated = drugs["name"][drugs["name"].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"The drug table names some drugs twice: {duplicated[:5]}.")
    return drugs.fillna({"smiles": "", "targets": ""}).astype({"name": str, "smiles": str, "targets": str})


def check_cell_lines(cell_lines: pd.DataFrame) -> pd.DataFrame:
    """Cell lines (rows) x genes (columns), each gene scaled to [-1, 1] across cell lines as in the O'Neil data."""
    values = cell_lines.to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError("The cell-line expression holds NaN or infinite values; expected every gene scaled to [-1, 1].")
    if values.min() < -1 - 1e-6 or values.max() > 1 + 1e-6:
        raise ValueError(f"The cell-line expression spans [{values.min():.3g}, {values.max():.3g}]; expected each gene "
                         "scaled to [-1, 1] across the cell lines (the O'Neil / CCLE preprocessing).")
    return cell_lines


def read_table(path: str | Path, index_col=None) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    return pd.read_csv(path, index_col=index_col, sep="\t" if path.suffix in (".tsv", ".txt") else ",")


def read_pairs(path: str | Path) -> pd.DataFrame:
    """Rows of (drug_a, drug_b, cell_line); the O'Neil names drug_a_name / drug_b_name work too."""
    pairs = read_table(path).rename(columns={"drug_a_name": "drug_a", "drug_b_name": "drug_b"})
    missing = [column for column in PAIR_COLUMNS if column not in pairs.columns]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing}: expected one row per combination with columns "
                         f"{', '.join(PAIR_COLUMNS)}.")
    return pairs


# ---------------------------------------------------------------------------------------------------- features
def morgan_fingerprints(drugs: pd.DataFrame, size: int, radius: int) -> np.ndarray:
    """[drugs, size] 0/1 Morgan fingerprint bits; all zeros for a drug without SMILES (known by its targets only)."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdFingerprintGenerator

    RDLogger.DisableLog("rdApp.*")  # an invalid SMILES is reported below, by drug name
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=size)
    bits = np.zeros((len(drugs), size), dtype=np.float32)
    for row, (name, smiles) in enumerate(zip(drugs["name"], drugs["smiles"])):
        if not smiles.strip():
            continue
        molecule = Chem.MolFromSmiles(smiles)
        if molecule is None:
            raise ValueError(f"Drug {name!r} has an invalid SMILES {smiles!r} (RDKit cannot parse it). Fix it, or "
                             "leave it empty to describe the drug by its targets only.")
        bits[row] = generator.GetFingerprintAsNumPy(molecule)
    return bits


def target_token_ids(drugs: pd.DataFrame, tokenizer: GeneExpressionTokenizer) -> tuple[np.ndarray, dict]:
    """[drugs, most targets] gene token ids of each drug's targets, right-padded with 0 (the pad id), and a report
    of the targets outside the vocabulary (which cannot be read from the gene table)."""
    targets = [[gene for gene in text.split(";") if gene.strip()] for text in drugs["targets"]]
    ids = np.zeros((len(drugs), max([1, *map(len, targets)])), dtype=np.int64)
    unmatched = {}
    for row, (name, genes) in enumerate(zip(drugs["name"], targets)):
        if not genes:
            continue
        token_ids = tokenizer.gene_token_ids(genes)
        known = np.unique(token_ids[token_ids >= 0])  # a target named twice (e.g. human and mouse symbol) counts once
        ids[row, : len(known)] = known
        if (token_ids < 0).any():
            unmatched[name] = [gene for gene, i in zip(genes, token_ids) if i < 0]
    return ids, {"drugs_without_targets": [n for n, g in zip(drugs["name"], targets) if not g],
                 "targets_outside_vocabulary": unmatched}


def cell_line_cells(cell_lines: pd.DataFrame) -> ad.AnnData:
    """The cell lines as an AnnData the tokenizer reads (see the module docstring for the transform)."""
    values = ((cell_lines.to_numpy(dtype=np.float32) + 1) / 2 * CELL_LINE_VALUE_SCALE).clip(min=0)
    genes = ad.utils.make_index_unique(pd.Index(cell_lines.columns.astype(str)))
    return ad.AnnData(values, obs=pd.DataFrame(index=cell_lines.index.astype(str)), var=pd.DataFrame(index=genes))


@dataclass
class SynergyInputs:
    """Everything a (drug A, drug B, cell line) row is looked up in: built once, gathered per batch."""

    drug_names: list[str]
    fingerprints: torch.Tensor  # [drugs, fingerprint bits]
    target_ids: torch.Tensor  # [drugs, most targets]
    cell_line_names: list[str]
    cell_embeddings: torch.Tensor  # [cell lines, pooled_size]

    def row_indices(self, pairs: pd.DataFrame) -> torch.Tensor:
        """[rows, 3] (drug A, drug B, cell line) indices; an unknown drug or cell line is an error naming it."""
        lookups = {"drug_a": self.drug_names, "drug_b": self.drug_names, "cell_line": self.cell_line_names}
        columns = []
        for column, names in lookups.items():
            index = {name: i for i, name in enumerate(names)}
            values = pairs[column].astype(str)
            unknown = sorted(set(values) - set(index))
            if unknown:
                kind = "cell line" if column == "cell_line" else "drug"
                source = "expression table" if column == "cell_line" else "drug table (name, smiles, targets)"
                raise ValueError(f"Unknown {kind}s in column {column!r}: {unknown[:5]}"
                                 f"{' ...' if len(unknown) > 5 else ''}; the {source} has no row for them "
                                 f"(known: {names[:5]} ...).")
            columns.append(torch.tensor(values.map(index).to_numpy(), dtype=torch.long))
        return torch.stack(columns, dim=1)

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's inputs for [B, 3] index rows."""
        a, b, line = rows.unbind(dim=1)
        return {"drug_a_fingerprints": self.fingerprints[a], "drug_a_target_ids": self.target_ids[a],
                "drug_b_fingerprints": self.fingerprints[b], "drug_b_target_ids": self.target_ids[b],
                "cell_embeddings": self.cell_embeddings[line]}


def build_inputs(model: ScBert2ForDrugSynergy, tokenizer: GeneExpressionTokenizer, drugs: pd.DataFrame,
                 cell_lines: pd.DataFrame) -> tuple[SynergyInputs, dict]:
    targets, report = target_token_ids(drugs, tokenizer)
    fingerprints = morgan_fingerprints(drugs, model.config.drug_fingerprint_size, model.config.drug_fingerprint_radius)
    cell_embeddings = embed_cells(model, tokenizer, cell_line_cells(cell_lines))
    report = {**report, "drugs_without_smiles": drugs["name"][drugs["smiles"].str.strip() == ""].tolist(),
              "cell_line_genes": str(tokenizer.last_report)}
    return SynergyInputs(drugs["name"].tolist(), torch.from_numpy(fingerprints), torch.from_numpy(targets),
                         cell_lines.index.astype(str).tolist(), cell_embeddings), report


class SynergyCollator:
    """Index rows (+ standardised scores) -> model inputs; the loop trains on standardised scores."""

    def __init__(self, inputs: SynergyInputs, mean: float = 0.0, std: float = 1.0):
        self.inputs, self.mean, self.std = inputs, mean, std

    def __call__(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        rows = torch.stack([item[0] for item in items])
        scores = torch.stack([item[1] for item in items])
        return {**self.inputs.batch(rows), "labels": (scores - self.mean) / self.std}


# ---------------------------------------------------------------------------------------------------- splits
def split_rows(scores: pd.DataFrame, split: str, test_fold: int | None, seed: int,
               num_folds: int = 5, validation_share: float = 0.15) -> dict[str, np.ndarray]:
    """Row numbers of train / validation / test. `random`: the data's own `fold` column (rows without a fold train
    only); `cell_line`: the cell lines shuffled into `num_folds` groups, one held out, and validation cell lines taken
    from the rest (the data's `cl_fold` holds out cell lines in one fold only, so it is not used)."""
    rng = np.random.default_rng(seed)
    rows = np.arange(len(scores))
    if split == "random":
        if test_fold is not None and "fold" not in scores.columns:
            raise ValueError("--split random --test_fold needs a `fold` column in the scores.")
        test = rows[scores["fold"].to_numpy() == test_fold] if test_fold is not None else rows[:0]
        rest = np.setdiff1d(rows, test)
        validation = np.sort(rng.choice(rest, size=int(round(validation_share * len(rest))), replace=False))
        return {"train": np.setdiff1d(rest, validation), "validation": validation, "test": test}
    lines = rng.permutation(np.unique(scores["cell_line"].astype(str)))
    groups = np.array_split(lines, num_folds)
    test_lines = groups[test_fold] if test_fold is not None else np.array([], dtype=lines.dtype)
    rest_lines = np.setdiff1d(lines, test_lines)
    validation_lines = rng.choice(rest_lines, size=max(1, int(round(validation_share * len(rest_lines)))), replace=False)
    line_of_row = scores["cell_line"].astype(str).to_numpy()
    return {"train": rows[~np.isin(line_of_row, np.concatenate([test_lines, validation_lines]))],
            "validation": rows[np.isin(line_of_row, validation_lines)], "test": rows[np.isin(line_of_row, test_lines)]}


def regression_metrics(observed: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    return {"pearson": float(stats.pearsonr(observed, predicted)[0]),
            "spearman": float(stats.spearmanr(observed, predicted)[0]),
            "rmse": float(np.sqrt(np.mean((observed - predicted) ** 2))), "rows": int(len(observed))}


# ---------------------------------------------------------------------------------------------------- model
def build_model(args: argparse.Namespace) -> tuple[ScBert2ForDrugSynergy, GeneExpressionTokenizer]:
    """The synergy head on the pretrained encoder of `--model` (or a random one, `--from_scratch`), encoder frozen."""
    config, tokenizer = load_pretrained_folder(args.model, expected_types=("scbert2",))
    config.update({"drug_fingerprint_size": args.fingerprint_bits, "synergy_hidden_size": args.synergy_hidden_size,
                   "classifier_dropout": args.dropout})
    return frozen_encoder_head(ScBert2ForDrugSynergy, args.model, config, args.from_scratch), tokenizer


def fold_scale_into_output(model: ScBert2ForDrugSynergy, mean: float, std: float) -> ScBert2ForDrugSynergy:
    """A copy that predicts in score units: the standardisation folded into the last layer's weights."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.score_proj.weight.mul_(std)
        model.score_proj.bias.mul_(std).add_(mean)
    return model


@torch.no_grad()
def predict_rows(model: ScBert2ForDrugSynergy, inputs: SynergyInputs, rows: torch.Tensor,
                 batch_size: int = 1024) -> np.ndarray:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts = [model(**{k: v.to(device) for k, v in inputs.batch(rows[start:start + batch_size]).items()}).predictions
             for start in range(0, len(rows), batch_size)]
    model.train(was_training)
    return torch.cat(parts).float().cpu().numpy() if parts else np.zeros(0, dtype=np.float32)


def save_synergy_folder(model, tokenizer, drugs: pd.DataFrame, cell_lines: pd.DataFrame, folder: Path) -> None:
    save_model_folder(model, tokenizer, folder)
    drugs.to_csv(folder / DRUGS_FILE, index=False)
    cell_lines.to_csv(folder / CELL_LINES_FILE)


# ---------------------------------------------------------------------------------------------------- train
def build_train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scbert synergy train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the O'Neil folder (synergy_score.csv, smiles_merck.csv, ...)")
    parser.add_argument("--model", required=True, help="a pretrained scBERT 2.0 folder (e.g. checkpoints/scbert2-small)")
    parser.add_argument("--from_scratch", action="store_true",
                        help="ablation: the same encoder shape and tokenizer, randomly initialised")
    parser.add_argument("--split", choices=SPLITS, default="random")
    parser.add_argument("--test_fold", type=int, default=None, help="0-4: the fold held out as test; none: train on all")
    parser.add_argument("--split_seed", type=int, default=0)
    parser.add_argument("--fingerprint_bits", type=int, default=1024)
    parser.add_argument("--synergy_hidden_size", type=int, default=512)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--patience", type=int, default=10, help="epochs without a better validation RMSE")
    add_training_arguments(parser)
    parser.set_defaults(**DEFAULTS)
    return parser


def train(argv=None) -> dict:
    args = build_train_parser().parse_args(argv)
    if args.test_fold is not None and not 0 <= args.test_fold < 5:
        raise ValueError(f"--test_fold must be in 0..4 (five folds), got {args.test_fold}.")
    accelerator = make_accelerator(args, "synergy")
    set_seed(args.seed)
    scores, drugs, cell_lines = read_oneil(args.data)
    model, tokenizer = build_model(args)
    inputs, report = build_inputs(model, tokenizer, drugs, cell_lines)
    rows = inputs.row_indices(scores)
    observed = torch.tensor(scores["synergy"].to_numpy(), dtype=torch.float32)
    split = split_rows(scores, args.split, args.test_fold, args.split_seed)
    mean, std = float(observed[split["train"]].mean()), float(observed[split["train"]].std())
    model.set_cell_statistics(inputs.cell_embeddings[rows[split["train"], 2].unique()])
    train_loader = DataLoader(TensorDataset(rows[split["train"]], observed[split["train"]]),
                              batch_size=args.per_device_batch_size, shuffle=True,
                              collate_fn=SynergyCollator(inputs, mean, std),
                              generator=torch.Generator().manual_seed(args.seed))
    output = Path(args.output_dir) / "model"

    def evaluate(model) -> dict[str, float]:
        predicted = predict_rows(model, inputs, rows[split["validation"]]) * std + mean
        return regression_metrics(observed[split["validation"]].numpy(), predicted)

    def save_best(best) -> None:
        if accelerator.is_main_process:
            save_synergy_folder(fold_scale_into_output(accelerator.unwrap_model(best), mean, std), tokenizer, drugs,
                                cell_lines, output)

    early_stopping = EarlyStopping("rmse", greater_is_better=False, patience=args.patience, on_new_best=save_best)
    result = train_loop(accelerator, model, train_loader, args, evaluate=evaluate, early_stopping=early_stopping)
    best = ScBert2ForDrugSynergy.from_pretrained(output)
    results = {"data": str(args.data), "pretrained_from": None if args.from_scratch else args.model,
               "split": {"kind": args.split, "test_fold": args.test_fold, "split_seed": args.split_seed,
                         **{part: int(len(index)) for part, index in split.items()}},
               "cell_line_value_scale": CELL_LINE_VALUE_SCALE, "inputs": report,
               "training": {"seconds": result.seconds, "steps": result.step, "epoch_kept": result.best_epoch,
                            "best_validation_rmse": result.best_metric, "score_mean": mean, "score_std": std}}
    test_predictions = predict_rows(best, inputs, rows[split["test"]])
    if len(split["test"]):
        results["test"] = regression_metrics(observed[split["test"]].numpy(), test_predictions)
    if accelerator.is_main_process:
        (Path(args.output_dir) / "results.json").write_text(json.dumps(results, indent=2))
        scores.iloc[split["test"]][[*PAIR_COLUMNS, "synergy"]].assign(predicted_synergy=test_predictions).to_csv(
            Path(args.output_dir) / "test_predictions.csv", index=False)
        summary = results.get("test", {"validation_rmse": result.best_metric})
        print(f"synergy ({args.split} split, test fold {args.test_fold}): "
              + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
              + f"; model in {output}")
    accelerator.end_training()
    return results


# ---------------------------------------------------------------------------------------------------- predict
def build_predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scbert synergy predict",
                                     description="Predict the synergy of (drug_a, drug_b, cell_line) rows.")
    parser.add_argument("--model", required=True, help="a folder written by `scbert synergy train` (RUN/model)")
    parser.add_argument("--pairs", required=True, help="CSV/TSV with columns drug_a, drug_b, cell_line")
    parser.add_argument("--output", required=True, help="CSV: the pairs with a predicted_synergy column")
    parser.add_argument("--drugs", help=f"drug table (name, smiles, targets); default: the model's {DRUGS_FILE}")
    parser.add_argument("--cell_lines", help="cell lines x genes CSV, genes scaled to [-1, 1]; default: the model's "
                                             f"{CELL_LINES_FILE}")
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--debug", action="store_true")
    return parser


def predict(argv=None) -> pd.DataFrame:
    args = build_predict_parser().parse_args(argv)
    folder, output = Path(args.model), Path(args.output)
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it.")
    config, tokenizer = load_pretrained_folder(folder, expected_types=("scbert2",))
    if "ScBert2ForDrugSynergy" not in (config.architectures or []):
        raise ValueError(f"{folder} holds a {config.architectures} model, not a synergy head: train one with "
                         "`scbert synergy train`.")
    drugs = check_drugs(read_table(args.drugs or folder / DRUGS_FILE))
    cell_lines = check_cell_lines(read_table(args.cell_lines or folder / CELL_LINES_FILE, index_col=0))
    pairs = read_pairs(args.pairs)
    start = time.perf_counter()
    model = ScBert2ForDrugSynergy.from_pretrained(folder).to(args.device)
    inputs, _ = build_inputs(model, tokenizer, drugs, cell_lines)
    predictions = predict_rows(model, inputs, inputs.row_indices(pairs), args.batch_size)
    result = pairs.assign(predicted_synergy=predictions)
    result.to_csv(output, index=False)
    print(f"{len(result)} combinations predicted in {time.perf_counter() - start:.1f} s -> {output}")
    return result


COMMANDS = {"train": train, "predict": predict}


def main(argv=None) -> None:
    run_subcommand("synergy", COMMANDS, __doc__, argv)


if __name__ == "__main__":
    run_command(main)

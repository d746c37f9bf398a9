"""The drug-synergy head and `scbert synergy train|predict` on the real O'Neil data."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from modeling_scbert import ScBert2Config, ScBert2ForDrugSynergy
from tokenization import GeneExpressionTokenizer
from train import synergy

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "synergy" / "oneil_transynergy"
CHECKPOINT = ROOT / "checkpoints" / "scbert2-small"
VOCAB = 60


@pytest.fixture(scope="module")
def oneil():
    if not DATA.exists():
        pytest.skip(f"real data not found at {DATA} (the project's shared/data folder)")
    return synergy.read_oneil(DATA)


def tiny_head(**overrides) -> ScBert2ForDrugSynergy:
    torch.manual_seed(0)
    settings = {"vocab_size": VOCAB, "pooling": "mean", "drug_fingerprint_size": 32, "synergy_hidden_size": 16}
    config = ScBert2Config.from_preset("scbert2-tiny", **{**settings, **overrides})
    return ScBert2ForDrugSynergy(config).eval()


def random_inputs(batch: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(3, VOCAB, (batch, 4), generator=generator)
    targets[0] = 0  # a drug without targets
    return {"drug_a_fingerprints": torch.randint(0, 2, (batch, 32), generator=generator).float(),
            "drug_a_target_ids": targets,
            "drug_b_fingerprints": torch.randint(0, 2, (batch, 32), generator=generator).float(),
            "drug_b_target_ids": torch.randint(0, VOCAB, (batch, 3), generator=generator),
            "input_ids": torch.randint(3, VOCAB, (batch, 9), generator=generator),
            "values": torch.rand(batch, 9, generator=generator) * 4,
            "attention_mask": torch.ones(batch, 9, dtype=torch.long)}


def swapped(inputs: dict) -> dict:
    out = dict(inputs)
    for part in ("fingerprints", "target_ids"):
        out[f"drug_a_{part}"], out[f"drug_b_{part}"] = inputs[f"drug_b_{part}"], inputs[f"drug_a_{part}"]
    return out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("pooling", ["mean", "mean_max"])
def test_prediction_is_symmetric_in_the_two_drugs(seed, pooling):
    model, inputs = tiny_head(pooling=pooling), random_inputs(seed=seed)
    with torch.no_grad():
        forward, backward = model(**inputs).predictions, model(**swapped(inputs)).predictions
    torch.testing.assert_close(forward, backward, rtol=0, atol=0)
    assert forward.shape == (5,) and forward.std() > 0


def test_precomputed_cell_embeddings_give_the_same_prediction_as_tokens():
    model, inputs = tiny_head(), random_inputs()
    with torch.no_grad():
        from_tokens = model(**inputs)
        cells = model.embed_cells(inputs["input_ids"], inputs["values"], inputs["attention_mask"])
        drugs = {k: v for k, v in inputs.items() if k.startswith("drug")}
        from_embeddings = model(**drugs, cell_embeddings=cells)
    torch.testing.assert_close(from_tokens.predictions, from_embeddings.predictions)
    with pytest.raises(ValueError, match="cells either tokenized .* or as cell_embeddings"):
        model(**drugs)


def test_targets_are_read_from_the_gene_table_and_padding_is_ignored():
    model = tiny_head()
    ids = torch.tensor([[5, 7, 0, 0], [0, 0, 0, 0]])
    table = model.model.embeddings.gene_embeddings.weight
    with torch.no_grad():
        mean = model.target_embeddings(ids)
    torch.testing.assert_close(mean[0], (table[5] + table[7]) / 2)
    torch.testing.assert_close(mean[1], torch.zeros_like(mean[1]))


def test_loss_is_the_mean_squared_error_and_reaches_every_head_parameter():
    model = tiny_head().train()
    model.model.requires_grad_(False)
    labels = torch.linspace(-1, 1, 5)
    output = model(**random_inputs(), labels=labels)
    torch.testing.assert_close(output.loss, torch.nn.functional.mse_loss(output.predictions, labels))
    output.loss.backward()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(not name.startswith("model.") for name in trainable)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_save_load_round_trip_and_folded_scale(tmp_path, remote_code_predictions):
    model, inputs = tiny_head(), random_inputs()
    scaled = synergy.fold_scale_into_output(model, mean=6.0, std=20.0)
    with torch.no_grad():
        raw, rescaled = model(**inputs).predictions, scaled(**inputs).predictions
    torch.testing.assert_close(rescaled, raw * 20.0 + 6.0)
    scaled.save_pretrained(tmp_path)
    loaded = ScBert2ForDrugSynergy.from_pretrained(tmp_path).eval()
    assert loaded.config.drug_fingerprint_size == 32 and loaded.config.synergy_hidden_size == 16
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).predictions, rescaled)
    name, remote = remote_code_predictions(tmp_path, inputs)  # the folder as a Hub user without this package gets it
    assert name.endswith("modeling_scbert2.ScBert2ForDrugSynergy")
    np.testing.assert_allclose(remote, rescaled.numpy(), atol=1e-5)


def test_the_oneil_folder_reads_into_drug_and_cell_line_tables(oneil):
    scores, drugs, cell_lines = oneil
    assert len(scores) == 18552 and {"drug_a", "drug_b", "cell_line", "synergy", "fold"} <= set(scores.columns)
    assert len(drugs) == 38 and set(scores["drug_a"]) | set(scores["drug_b"]) <= set(drugs["name"])
    assert cell_lines.shape == (35, 2401) and set(scores["cell_line"]) == set(cell_lines.index)
    assert "PARP1" in drugs.set_index("name").loc["ABT-888", "targets"].split(";")


def test_fingerprints_invalid_smiles_and_the_targets_only_fallback():
    drugs = synergy.check_drugs(pd.DataFrame({"name": ["aspirin", "unknown structure"],
                                              "smiles": ["CC(=O)Oc1ccccc1C(=O)O", None], "targets": ["PTGS1", ""]}))
    bits = synergy.morgan_fingerprints(drugs, 256, 2)
    assert bits.shape == (2, 256) and bits[0].sum() > 5 and bits[1].sum() == 0
    bad = drugs.assign(smiles=["CC(=O", ""])
    with pytest.raises(ValueError, match="'aspirin' has an invalid SMILES 'CC\\(=O'"):
        synergy.morgan_fingerprints(bad, 256, 2)
    with pytest.raises(ValueError, match="lacks the columns \\['targets'\\]"):
        synergy.check_drugs(drugs.drop(columns="targets"))
    with pytest.raises(ValueError, match="names some drugs twice"):
        synergy.check_drugs(pd.concat([drugs, drugs]))


def test_target_genes_map_to_token_ids_and_the_unmatched_are_reported():
    tokenizer = GeneExpressionTokenizer.from_pretrained(CHECKPOINT)
    drugs = synergy.check_drugs(pd.DataFrame({"name": ["a", "b"], "smiles": ["C", "C"],
                                              "targets": ["PARP1;PARP2;NOT_A_GENE", ""]}))
    ids, report = synergy.target_token_ids(drugs, tokenizer)
    assert ids.shape == (2, 3) and (ids[0, :2] > 2).all() and (ids[0, 2:] == 0).all() and (ids[1] == 0).all()
    assert tokenizer.convert_ids_to_tokens(sorted(ids[0, :2].tolist())) == sorted(["PARP1", "PARP2"])
    assert report == {"drugs_without_targets": ["b"], "targets_outside_vocabulary": {"a": ["NOT_A_GENE"]}}


def test_cell_line_values_are_checked_and_transformed(oneil):
    _, _, cell_lines = oneil
    cells = synergy.cell_line_cells(cell_lines)
    # [-1, 1] -> [0, scale]: the data's extremes (-0.99998, 0.99998) land at the ends
    assert cells.X.min() < 1e-3 and abs(cells.X.max() - synergy.CELL_LINE_VALUE_SCALE) < 1e-3
    assert cells.var_names.is_unique and cells.n_vars == 2401
    with pytest.raises(ValueError, match="spans \\[-3, 1\\]; expected each gene scaled to \\[-1, 1\\]"):
        synergy.check_cell_lines(cell_lines.iloc[:2].assign(**{cell_lines.columns[0]: -3.0}))
    with pytest.raises(ValueError, match="NaN or infinite"):
        synergy.check_cell_lines(cell_lines.iloc[:2].assign(**{cell_lines.columns[0]: np.nan}))


@pytest.mark.parametrize("fold", [0, 3])
def test_cell_line_split_holds_whole_cell_lines_out(oneil, fold):
    scores = oneil[0]
    split = synergy.split_rows(scores, "cell_line", fold, seed=0)
    lines = {part: set(scores["cell_line"].iloc[rows]) for part, rows in split.items()}
    assert len(lines["test"]) == 7 and not lines["test"] & (lines["train"] | lines["validation"])
    assert not lines["train"] & lines["validation"] and len(lines["validation"]) == 4
    assert sum(len(rows) for rows in split.values()) == len(scores)
    all_test = set().union(*(set(scores["cell_line"].iloc[synergy.split_rows(scores, "cell_line", k, 0)["test"]])
                             for k in range(5)))
    assert len(all_test) == 35  # every cell line is a test line once


def test_random_split_follows_the_fold_column(oneil):
    scores = oneil[0]
    split = synergy.split_rows(scores, "random", 2, seed=0)
    assert (scores["fold"].iloc[split["test"]] == 2).all() and len(split["test"]) == (scores["fold"] == 2).sum()
    assert not set(split["train"]) & set(split["validation"]) and not set(split["train"]) & set(split["test"])
    assert len(split["train"]) + len(split["validation"]) + len(split["test"]) == len(scores)


def test_unknown_drugs_and_cell_lines_are_named():
    inputs = synergy.SynergyInputs(["A", "B"], torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.long),
                                   ["L1"], torch.zeros(1, 3))
    good = pd.DataFrame({"drug_a": ["A"], "drug_b": ["B"], "cell_line": ["L1"]})
    assert inputs.row_indices(good).tolist() == [[0, 1, 0]]
    with pytest.raises(ValueError, match="Unknown drugs in column 'drug_b': \\['C'\\]"):
        inputs.row_indices(good.assign(drug_b="C"))
    with pytest.raises(ValueError, match="Unknown cell lines in column 'cell_line': \\['L9'\\].*expression table"):
        inputs.row_indices(good.assign(cell_line="L9"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.cli", "synergy", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def trained(oneil, tmp_path_factory) -> Path:
    """`scbert synergy train` for a few steps from the shipped checkpoint, a cell-line fold held out."""
    run = tmp_path_factory.mktemp("synergy") / "run"
    result = run_cli("train", "--data", str(DATA), "--model", str(CHECKPOINT), "--output_dir", str(run),
                     "--split", "cell_line", "--test_fold", "1", "--max_steps", "6", "--synergy_hidden_size", "32",
                     "--no_progress_bar")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_train_writes_a_folder_results_and_test_predictions(trained):
    results = json.loads((trained / "results.json").read_text())
    assert results["split"]["kind"] == "cell_line" and results["split"]["test"] == results["test"]["rows"] > 0
    assert -1 <= results["test"]["pearson"] <= 1 and results["test"]["rmse"] > 0
    assert results["inputs"]["drugs_without_targets"] == ["MITOMYCINE", "MK-4541", "MRK-003", "OXALIPLATIN"]
    folder = trained / "model"
    assert {"model.safetensors", "config.json", "tokenizer_config.json", "drugs.csv", "cell_lines.csv"} <= {
        p.name for p in folder.iterdir()}
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["ScBert2ForDrugSynergy"]
    test = pd.read_csv(trained / "test_predictions.csv")
    assert len(test) == results["test"]["rows"] and test["predicted_synergy"].std() > 0


def test_predict_reproduces_the_test_predictions_and_handles_a_targets_only_drug(trained, tmp_path):
    test = pd.read_csv(trained / "test_predictions.csv").head(50)
    pairs = tmp_path / "pairs.csv"
    test[["drug_a", "drug_b", "cell_line"]].to_csv(pairs, index=False)
    out = tmp_path / "predicted.csv"
    result = run_cli("predict", "--model", str(trained / "model"), "--pairs", str(pairs), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(pd.read_csv(out)["predicted_synergy"], test["predicted_synergy"], rtol=1e-4, atol=1e-4)

    drugs = pd.read_csv(trained / "model" / "drugs.csv")
    without_smiles = tmp_path / "drugs.csv"
    drugs.assign(smiles=np.where(drugs["name"] == test["drug_a"].iloc[0], "", drugs["smiles"])).to_csv(
        without_smiles, index=False)
    result = run_cli("predict", "--model", str(trained / "model"), "--pairs", str(pairs), "--output", str(out),
                     "--drugs", str(without_smiles), "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    fallback = pd.read_csv(out)["predicted_synergy"]
    assert np.isfinite(fallback).all() and not np.allclose(fallback.iloc[0], test["predicted_synergy"].iloc[0])


def test_predict_bad_inputs_get_clear_errors(trained, tmp_path):
    model = str(trained / "model")
    pairs = tmp_path / "pairs.csv"
    pd.DataFrame({"drug_a": ["5-FU"], "drug_b": ["NOT-A-DRUG"], "cell_line": ["A2058"]}).to_csv(pairs, index=False)
    out = tmp_path / "out.csv"
    result = run_cli("predict", "--model", model, "--pairs", str(pairs), "--output", str(out))
    assert result.returncode == 1 and "Unknown drugs in column 'drug_b': ['NOT-A-DRUG']" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()

    pd.DataFrame({"drug_a": ["5-FU"], "cell_line": ["A2058"]}).to_csv(pairs, index=False)
    result = run_cli("predict", "--model", model, "--pairs", str(pairs), "--output", str(out))
    assert result.returncode == 1 and "lacks the columns ['drug_b']" in result.stderr

    result = run_cli("predict", "--model", str(CHECKPOINT), "--pairs", str(pairs), "--output", str(out))
    assert result.returncode == 1 and "not a synergy head" in result.stderr

    out.write_text("keep me")
    result = run_cli("predict", "--model", model, "--pairs", str(pairs), "--output", str(out))
    assert result.returncode == 1 and "--overwrite" in result.stderr and out.read_text() == "keep me"

    result = run_cli("frobnicate")
    assert result.returncode == 1 and "scbert synergy {train|predict}" in result.stderr

"""The perturbation head and `scbert perturb train|predict` on the real Papalexi Perturb-seq screen."""

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from modeling_scbert import ScBert2Config, ScBert2ForPerturbationPrediction
from tokenization import GeneExpressionTokenizer
from train import perturb

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "perturbseq" / "papalexi2021_thp1_lowmoi.h5ad"
CHECKPOINT = ROOT / "checkpoints" / "scbert2-small"
VOCAB, OUTPUT_GENES = 40, [5, 9, 12]


def tiny_head() -> ScBert2ForPerturbationPrediction:
    torch.manual_seed(0)
    config = ScBert2Config.from_preset("scbert2-tiny", vocab_size=VOCAB, pooling="mean", synergy_hidden_size=16,
                                       perturbation_gene_ids=OUTPUT_GENES)
    model = ScBert2ForPerturbationPrediction(config).eval()
    with torch.no_grad():
        model.knockout_self_effect.fill_(-0.5)
    return model


def inputs(targets=(9, 30)) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"perturbation_ids": torch.tensor(targets), "control_expression": torch.rand(2, 3, generator=generator) + 1,
            "input_ids": torch.randint(3, VOCAB, (2, 7), generator=generator),
            "values": torch.rand(2, 7, generator=generator)}


def test_prediction_is_the_control_plus_the_change_and_the_target_is_knocked_down():
    model, batch = tiny_head(), inputs()
    with torch.no_grad():
        output = model(**batch)
        model.knockout_self_effect.zero_()
        without_self_effect = model(**batch)
    torch.testing.assert_close(output.predictions, batch["control_expression"] + output.deltas)
    # target 9 is output gene 1 in row 0: only that entry moves, by -0.5 x its control expression
    moved = output.deltas - without_self_effect.deltas
    expected = torch.zeros(2, 3)
    expected[0, 1] = -0.5 * batch["control_expression"][0, 1]
    torch.testing.assert_close(moved, expected)


def test_precomputed_embeddings_round_trip_and_loss(tmp_path, remote_code_predictions):
    model, batch = tiny_head(), inputs()
    with torch.no_grad():
        cells = model.embed_cells(batch["input_ids"], batch["values"])
        direct = model(**batch).predictions
        precomputed = model(batch["perturbation_ids"], batch["control_expression"], cell_embeddings=cells).predictions
    torch.testing.assert_close(direct, precomputed)
    model.save_pretrained(tmp_path)
    loaded = ScBert2ForPerturbationPrediction.from_pretrained(tmp_path).eval()
    assert loaded.config.perturbation_gene_ids == OUTPUT_GENES
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).predictions, direct)
    name, remote = remote_code_predictions(tmp_path, batch)  # as remote code, without this package
    assert name.endswith("modeling_scbert2.ScBert2ForPerturbationPrediction")
    np.testing.assert_allclose(remote, direct.numpy(), atol=1e-5)
    labels = torch.zeros(2, 3)
    output = loaded(**batch, labels=labels)
    torch.testing.assert_close(output.loss, torch.nn.functional.mse_loss(output.predictions, labels))


def test_output_genes_are_required_and_validated():
    config = ScBert2Config.from_preset("scbert2-tiny", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="needs `config.perturbation_gene_ids`"):
        ScBert2ForPerturbationPrediction(config)
    with pytest.raises(Exception, match="distinct gene token ids in \\[3, 40\\).*outside: \\[1, 44\\]"):
        ScBert2Config(vocab_size=VOCAB, perturbation_gene_ids=[1, 5, 44])


def test_effect_metrics_known_answers():
    control = np.array([1.0, 2.0, 3.0, 4.0])
    observed = np.array([0.5, 2.5, 3.0, 5.0])
    de = np.array([0, 1, 3])
    perfect = perturb.effect_metrics(observed, observed, control, de)
    assert perfect["mse"] == 0 and perfect["pearson_delta"] == pytest.approx(1) and perfect["direction_top20_de"] == 1
    unchanged = perturb.effect_metrics(control, observed, control, de)
    assert unchanged["pearson_delta"] is None and unchanged["direction_top20_de"] is None
    assert unchanged["mse_top20_de"] == pytest.approx((0.25 + 0.25 + 1) / 3)
    flipped = perturb.effect_metrics(2 * control - observed, observed, control, de)
    assert flipped["direction_top20_de"] == 0 and flipped["pearson_delta"] == pytest.approx(-1)


def test_folds_partition_the_targets():
    targets = [f"G{i}" for i in range(25)]
    folds = perturb.fold_targets(targets)
    assert len(folds) == 5 and sorted(sum(folds, [])) == sorted(targets) and {len(f) for f in folds} == {5}
    assert folds == perturb.fold_targets(list(reversed(targets)))
    split = perturb.split_targets(targets, 1, 3, seed=0)
    assert split["test"] == folds[1] and len(split["validation"]) == 3
    assert not set(split["train"]) & (set(split["validation"]) | set(split["test"]))


def synthetic_screen() -> perturb.PerturbSeq:
    expression = np.array([[1, 1], [1, 3], [3, 1], [2, 2], [4, 4]], dtype=np.float32)
    labels = np.array(["ctrl", "ctrl", "A", "B", "C"])
    return perturb.PerturbSeq(ad.AnnData(expression), expression, ["g1", "g2"], np.array([3, 4]), labels, "ctrl")


def test_top_de_genes_rank_down_and_up_regulated_genes_by_size():
    rng = np.random.default_rng(0)
    control, knocked = rng.normal(2, 0.1, size=(50, 4)), rng.normal(2, 0.1, size=(50, 4))
    knocked[:, 1] -= 1.5  # the knock-down
    knocked[:, 3] += 0.5
    expression = np.vstack([control, knocked]).astype(np.float32)
    labels = np.array(["ctrl"] * 50 + ["A"] * 50)
    screen = perturb.PerturbSeq(ad.AnnData(expression), expression, ["g0", "g1", "g2", "g3"], np.arange(3, 7),
                                labels, "ctrl")
    assert perturb.top_de_genes(screen, ["A"], n=2)["A"].tolist() == [1, 3]


def test_mean_shift_and_linear_baselines_use_only_training_targets():
    screen = synthetic_screen()
    table = np.random.default_rng(0).normal(size=(10, 4))
    profiles = perturb.baseline_profiles(screen, ["A", "B"], ["C"], table, {"A": 5, "B": 6, "C": 7})
    np.testing.assert_allclose(profiles["no_change"]["C"], [1, 2])
    np.testing.assert_allclose(profiles["mean_shift"]["C"], [1 + (2 + 1) / 2, 2 + (-1 + 0) / 2])
    assert profiles["linear_gene_table"]["C"].shape == (2,)


@pytest.fixture(scope="module")
def small_screen(tmp_path_factory) -> Path:
    """1,200 Papalexi cells, every perturbation kept."""
    if not DATA.exists():
        pytest.skip(f"real data not found at {DATA} (the project's shared/data folder)")
    screen = ad.read_h5ad(DATA)
    rows = np.sort(np.random.default_rng(0).choice(screen.n_obs, size=1200, replace=False))
    path = tmp_path_factory.mktemp("perturb") / "screen.h5ad"
    screen[rows].copy().write_h5ad(path)
    return path


def test_screen_bad_inputs_get_clear_errors(small_screen):
    tokenizer = GeneExpressionTokenizer.from_pretrained(CHECKPOINT, min_overlap=0.0)
    with pytest.raises(ValueError, match="no column 'guide_target'"):
        perturb.load_screen(small_screen, tokenizer, "guide_target", "non-targeting")
    with pytest.raises(ValueError, match="No control cells: .* no cell labelled 'NT'"):
        perturb.load_screen(small_screen, tokenizer, "perturbation", "NT")
    with pytest.raises(ValueError, match="not in the model's vocabulary: \\['NOTAGENE1'\\]"):
        perturb.target_token_ids(["STAT1", "NOTAGENE1"], tokenizer)
    screen = perturb.load_screen(small_screen, tokenizer, "perturbation", "non-targeting")
    assert screen.expression.shape[0] == 1200 and len(screen.targets) == 25 and len(screen.genes) > 250


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.cli", "perturb", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def trained(small_screen) -> Path:
    run = small_screen.parent / "run"
    result = run_cli("train", "--data", str(small_screen), "--model", str(CHECKPOINT), "--output_dir", str(run),
                     "--test_fold", "2", "--max_steps", "4", "--hidden_size", "32", "--no_progress_bar")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_train_scores_the_held_out_targets_next_to_the_baselines(trained):
    results = json.loads((trained / "results.json").read_text())
    test_targets = results["split"]["test"]
    assert len(test_targets) == 5 and not set(test_targets) & set(results["split"]["train"])
    assert set(results["test"]) == {"model", "no_change", "mean_shift", "linear_gene_table"}
    for per_target in results["test"].values():
        assert set(per_target) == set(test_targets)
        assert all(row["mse"] >= 0 and row["mse_top20_de"] >= 0 for row in per_target.values())
    profiles = ad.read_h5ad(trained / "test_profiles.h5ad")
    assert profiles.n_obs == 5 * 5 and set(profiles.uns["top20_de"]) == set(test_targets)


def test_predict_writes_profiles_for_a_target_never_seen(trained, small_screen, tmp_path):
    results = json.loads((trained / "results.json").read_text())
    unseen = results["split"]["test"][0]
    out = tmp_path / "predicted.h5ad"
    result = run_cli("predict", "--model", str(trained / "model"), "--data", str(small_screen), "--perturbation_key",
                     "perturbation", "--perturbations", unseen, "MYC", "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = ad.read_h5ad(out)
    assert list(predicted.obs_names) == ["control", unseen, "MYC"] and np.isfinite(predicted.X).all()
    np.testing.assert_allclose(predicted.layers["delta"][0], 0, atol=1e-6)
    # the saved test profile of that target was predicted on the same control cells
    saved = ad.read_h5ad(trained / "test_profiles.h5ad")[f"model:{unseen}"].X[0]
    np.testing.assert_allclose(predicted[unseen].X[0], saved, atol=1e-4)


def test_predict_bad_inputs_get_clear_errors(trained, small_screen, tmp_path):
    model, out = str(trained / "model"), tmp_path / "out.h5ad"
    result = run_cli("predict", "--model", model, "--data", str(small_screen), "--perturbations", "NOTAGENE1",
                     "--output", str(out))
    assert result.returncode == 1 and "not in the model's vocabulary: ['NOTAGENE1']" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()

    fewer_genes = tmp_path / "fewer.h5ad"
    ad.read_h5ad(small_screen)[:, 10:].copy().write_h5ad(fewer_genes)
    result = run_cli("predict", "--model", model, "--data", str(fewer_genes), "--perturbations", "STAT1",
                     "--output", str(out))
    assert result.returncode == 1 and "genes are not measured in the data" in result.stderr

    result = run_cli("predict", "--model", str(CHECKPOINT), "--data", str(small_screen), "--perturbations", "STAT1",
                     "--output", str(out))
    assert result.returncode == 1 and "not a perturbation head" in result.stderr

    out.write_text("keep me")
    result = run_cli("predict", "--model", model, "--data", str(small_screen), "--perturbations", "STAT1",
                     "--output", str(out))
    assert result.returncode == 1 and "--overwrite" in result.stderr and out.read_text() == "keep me"

"""The performance suite runs end to end (tiny model, quick settings) and writes its JSON, table and plots."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_quick_run_writes_results(tmp_path, baron):
    out = tmp_path / "bench"
    command = [sys.executable, "benchmarks/run.py", "--quick", "--models", "scbert2-tiny-sdpa",
               "--scaling-preset", "scbert2-tiny", "--output-dir", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads((out / "scbert2-tiny-sdpa.json").read_text())
    tasks = {m["task"] for m in measured["measurements"]}
    assert tasks == {"inference", "training"}
    assert all(m["cells_per_s"] > 0 and m["flops_per_cell"] > 0 for m in measured["measurements"])
    assert measured["machine"]["cpu_count"] >= 1 and measured["machine"]["cpu_capability"]
    assert (out / "README.md").read_text().count("scbert2-tiny-sdpa") >= 2
    assert (out / "inference_cells_per_s.png").stat().st_size > 0


def test_paired_timing_writes_ratios_per_round(tmp_path, baron):
    out = tmp_path / "paired"
    command = [sys.executable, "benchmarks/paired.py", "--reference", "scbert2-tiny-sdpa", "--models",
               "scbert2-small-sdpa", "--rounds", "3", "--warmup", "1", "--idle-timeout", "0", "--output-dir", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads((out / "paired.json").read_text())
    small = measured["models"]["scbert2-small-sdpa"]
    assert len(small["seconds_per_call"]) == 3 and small["cells_per_s"] > 0
    ratio = small["ratio_vs_reference"]
    assert ratio["min"] <= ratio["median"] <= ratio["max"]
    assert "ratio_vs_reference" not in measured["models"]["scbert2-tiny-sdpa"]
    assert "| scbert2-small-sdpa |" in (out / "paired.md").read_text()

    unknown = subprocess.run([*command[:3], "no-such-model"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert unknown.returncode != 0 and "unknown model(s) ['no-such-model']" in unknown.stderr


def test_label_efficiency_runs_pretrained_scratch_and_baseline_on_the_same_cells(tmp_path, baron):
    import numpy as np

    labels = baron.obs["cell_type1"].astype(str).to_numpy()
    rows = np.concatenate([np.flatnonzero(labels == name)[:12] for name in ("alpha", "delta", "ductal")])
    detected = np.asarray((baron.X > 0).sum(axis=0)).ravel()
    cells = baron[rows][:, np.sort(np.argsort(-detected)[:300])].copy()
    cells.write_h5ad(tmp_path / "cells.h5ad")
    common = ["--max_length", "64", "--no_progress_bar", "--num_workers", "0", "--cache_dir", str(tmp_path / "cache")]
    pretrain = [sys.executable, "-m", "train.pretrain", "--data", str(tmp_path / "cells.h5ad"), "--architecture",
                "scbert2-tiny", "--max_steps", "2", "--output_dir", str(tmp_path / "pt"), *common]
    assert subprocess.run(pretrain, cwd=ROOT, capture_output=True, timeout=600).returncode == 0
    out = tmp_path / "results"
    command = [sys.executable, "-m", "benchmarks.label_efficiency", "--data", str(tmp_path / "cells.h5ad"),
               "--pretrained", str(tmp_path / "pt" / "model"), "--architecture", "scbert2-tiny", "--k", "2", "4",
               "--draws", "2", "--first_draw", "1", "--steps", "4", "--output_dir", str(tmp_path / "runs"),
               "--results_dir", str(out), "--", "--ema_decay", "0", *common]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "label_efficiency_cells.json").read_text())
    assert [(r["k"], r["draw"]) for r in summary["runs"]] == [(2, 1), (2, 2), (4, 1), (4, 2)]
    assert all(r["train_cells"] == 3 * r["k"] and r["train_cells"] + r["test_cells"] == 36 for r in summary["runs"])
    assert set(summary["table"]["2"]) >= {"pretrained_macro_f1", "scratch_macro_f1", "baseline_macro_f1"}
    assert (out / "label_efficiency_cells.png").stat().st_size > 0

    # Another pretrained-arm setting beside the same from-scratch runs, which are taken, not trained again.
    def probe(k: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "benchmarks.label_efficiency", "--data", str(tmp_path / "cells.h5ad"),
                   "--pretrained", str(tmp_path / "pt" / "model"), "--architecture", "scbert2-tiny", "--k", k,
                   "--draws", "2", "--first_draw", "1", "--steps", "4", "--output_dir", str(tmp_path / "runs"),
                   "--results_dir", str(out), "--name", "scale_0.0", "--pretrained_args",
                   "--encoder_learning_rate_scale 0", "--reuse_scratch", str(out / "label_efficiency_cells.json"), "--",
                   "--ema_decay", "0", *common]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)

    result = probe("2")
    assert result.returncode == 0, result.stderr[-3000:]
    probed = json.loads((out / "label_efficiency_scale_0.0.json").read_text())  # a dot in --name is kept
    assert [run["scratch"]["macro_f1"] for run in probed["runs"]] == [
        run["scratch"]["macro_f1"] for run in summary["runs"] if run["k"] == 2]
    assert "--encoder_learning_rate_scale 0" in result.stdout
    assert not (tmp_path / "runs" / "scale_0.0" / "k2" / "draw1" / "scratch").exists()
    missing = probe("3")
    assert missing.returncode != 0 and "--reuse_scratch has no from-scratch run for k = 3, draw 1" in missing.stderr

    # The pretrained arm from the checkpoint pretrained further on the cells (no labels).
    command = [sys.executable, "-m", "benchmarks.label_efficiency", "--data", str(tmp_path / "cells.h5ad"),
               "--pretrained", str(tmp_path / "pt" / "model"), "--architecture", "scbert2-tiny", "--k", "2",
               "--draws", "1", "--first_draw", "1", "--steps", "4", "--output_dir", str(tmp_path / "runs"),
               "--results_dir", str(out), "--name", "continued", "--continue_pretraining", "1",
               "--continue_pretraining_args", f"--max_steps 2 {' '.join(common)}",
               "--reuse_scratch", str(out / "label_efficiency_cells.json"), "--", "--ema_decay", "0", *common]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    continued = json.loads((out / "label_efficiency_continued.json").read_text())["continued_pretraining"]
    folder = tmp_path / "runs" / "continued" / "continued" / "model"
    assert continued["folder"] == str(folder) and continued["summary"]["steps"] == 2
    log = tmp_path / "runs" / "continued" / "k2" / "draw1" / "pretrained" / "logs" / "finetune.jsonl"
    assert json.loads(log.read_text().splitlines()[0])["config"]["model"] == str(folder)


def test_label_efficiency_refuses_a_negative_continued_pretraining(tmp_path):
    from benchmarks import label_efficiency

    with pytest.raises(ValueError, match="--continue_pretraining takes a number of epochs >= 0"):
        label_efficiency.main(["--continue_pretraining", "-1", "--output_dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_zero_shot_scores_the_checkpoint_against_pca(tmp_path):
    checkpoints = [str(ROOT / "checkpoints" / name) for name in ("scbert2-small", "scbert-small")]
    command = [sys.executable, "-m", "benchmarks.zero_shot", "--checkpoints", *checkpoints, "--datasets",
               "pbmc68k_reduced", "--highly_variable_genes", "0", "--output_dir", str(tmp_path),
               "--results_dir", str(tmp_path / "results")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((tmp_path / "results" / "zero_shot.json").read_text())["results"]["pbmc68k_reduced"]["scores"]
    assert len(scores) == 9 and all(0 <= s["knn_accuracy"] <= 1 and -1 <= s["silhouette"] <= 1 for s in scores.values())
    assert {f"scbert-small {state}, its panel{genes}" for state in ("pretrained", "untrained")
            for genes in ("", "'s expressed genes")} < set(scores)
    assert {f"scbert2-small {state}, most expressed genes{reading}" for state in ("pretrained", "untrained")
            for reading in ("", ", expression through the gene table")} < set(scores)


def test_zero_shot_v1_expressed_pooling_averages_the_states_of_the_expressed_panel_genes(baron):
    import torch
    from transformers import AutoModel

    from benchmarks.zero_shot import mean_gene_states
    from tokenization import GeneExpressionTokenizer

    folder = str(ROOT / "checkpoints" / "scbert-small")
    tokenizer, cells = GeneExpressionTokenizer.from_pretrained(folder), baron[:3]
    # One batch of all three: FAVOR+'s key stabiliser is a maximum over the batch, so states depend on its cells a little.
    pooled = mean_gene_states(folder, tokenizer, cells, 3, pretrained=True, expressed_only=True)
    batch = tokenizer(cells, return_tensors="pt")
    with torch.no_grad():
        states = AutoModel.from_pretrained(folder).eval()(**batch).last_hidden_state[:, :-1]
    for cell in range(3):
        expressed = batch["input_ids"][cell, :-1] > 0
        assert 0 < expressed.sum() < expressed.numel()
        np.testing.assert_allclose(pooled[cell], states[cell, expressed].mean(0).numpy(), rtol=1e-4, atol=1e-5)


def test_novelty_benchmark_scores_a_held_out_type_with_every_rule(tmp_path):
    out = tmp_path / "novelty"
    command = [sys.executable, "-m", "benchmarks.novelty", "--datasets", "pbmc68k_reduced", "--types", "CD19+ B",
               "--output_dir", str(out), "--results_dir", str(out / "results"), "--", "--architecture",
               "scbert2-tiny", "--max_steps", "10", "--max_length", "64"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads((out / "results" / "novelty.json").read_text())["datasets"]["pbmc68k_reduced"]
    (run,) = measured["runs"]
    assert run["novel_type"] == "CD19+ B" and run["novel_cells"] == 95
    assert set(run["scores"]) == {"scbert_rule", "max_probability", "energy", "prototype_distance", "mahalanobis",
                                  "expression_knn", "class_scaled_knn", "combined", "combined_max",
                                  "knn_energy", "knn_mahalanobis_energy", "combined_gated", "combined_max_gated",
                                  "knn_energy_gated", "knn_mahalanobis_energy_gated"}
    for rule in run["scores"].values():
        assert 0 <= rule["auroc"] <= 1 and 0 <= rule["novel_flagged"] <= 1 and 0 <= rule["known_flagged"] <= 1
    for name in ("knn_energy", "knn_mahalanobis_energy"):  # the gate only takes flags away, the ranking is the score's
        gated, plain = run["scores"][f"{name}_gated"], run["scores"][name]
        assert gated["auroc"] == plain["auroc"] and gated["known_flagged"] <= plain["known_flagged"]
        assert gated["novel_flagged"] <= plain["novel_flagged"]
    # Refitting the detector from the saved folder and split, without fine-tuning again, gives fine-tuning's own.
    refit = subprocess.run(command[:3] + ["--refit_detector"] + command[3:], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert refit.returncode == 0 and "train.finetune" not in refit.stdout, refit.stderr[-3000:]
    (refitted,) = json.loads((out / "results" / "novelty.json").read_text())["datasets"]["pbmc68k_reduced"]["runs"]
    for name, rule in run["scores"].items():
        assert refitted["scores"][name]["threshold"] == pytest.approx(rule["threshold"], rel=1e-3, abs=1e-5), name
    # The held-out type is absent from the known test cells and from the model's classes.
    model = json.loads((out / "pbmc68k_reduced" / "CD19__B" / "run" / "model" / "config.json").read_text())
    assert "CD19+ B" not in model["label2id"] and len(model["label2id"]) == 9
    assert "scBERT's rule" in (out / "results" / "novelty.md").read_text()


def test_int8_options_benchmark_runs_every_backend_on_a_classifier(tiny_classifier, tmp_path):
    out = tmp_path / "int8"
    command = [sys.executable, "-m", "benchmarks.int8_options", "--model", str(tiny_classifier), "--cells", "48",
               "--batch_size", "16", "--rounds", "2", "--threads", "1", "--results_dir", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads((out / "int8_options.json").read_text())["variants"]
    assert len(measured) == 6 and measured["float32 (sdpa)"]["agreement_with_float32"] == 1.0
    for row in measured.values():
        assert len(row["seconds_per_pass"]) == 2 and row["cells_per_second"] > 0
        assert 0.5 <= row["agreement_with_float32"] <= 1.0  # int8 may flip a borderline cell, not half of them
    # ONNX Runtime float32 runs the same graph: the same predictions.
    assert measured["onnxruntime float32"]["agreement_with_float32"] == 1.0


def test_synergy_benchmark_scores_the_head_and_a_baseline_on_one_fold(tmp_path):
    out = tmp_path / "synergy"
    command = [sys.executable, "-m", "benchmarks.synergy", "--splits", "cell_line", "--folds", "1", "--models",
               "scbert2_pretrained", "one_hot_mlp", "--baseline_epochs", "1", "--output_dir", str(out),
               "--results_dir", str(out / "results"), "--", "--max_steps", "3", "--synergy_hidden_size", "32"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads((out / "results" / "synergy.json").read_text())
    assert [(r["split"], r["fold"], r["model"]) for r in measured["runs"]] == [
        ("cell_line", 1, "scbert2_pretrained"), ("cell_line", 1, "one_hot_mlp")]
    assert all(-1 <= r["metrics"]["pearson"] <= 1 and r["metrics"]["rows"] > 3000 for r in measured["runs"])
    assert "| cell_line | one_hot_mlp |" in (out / "results" / "synergy.md").read_text()
    assert (out / "results" / "synergy.png").stat().st_size > 0


def test_perturb_benchmark_scores_the_head_and_the_baselines_on_one_fold(tmp_path):
    out = tmp_path / "perturb"
    command = [sys.executable, "-m", "benchmarks.perturb", "--folds", "3", "--models", "pretrained", "--output_dir",
               str(out), "--results_dir", str(out / "results"), "--", "--max_steps", "3", "--hidden_size", "32"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "results" / "perturb.json").read_text())["summary"]
    every = summary["all test targets"]
    assert set(every) == {"scbert2_pretrained", "no_change", "mean_shift", "linear_gene_table"}
    assert all(row["targets"] == 5 for row in every.values()) and every["no_change"]["pearson_delta"] is None
    measured = summary["the 9 measured targets"]["mean_shift"]["targets"]
    assert measured + summary["the other targets"]["mean_shift"]["targets"] == 5
    assert (out / "results" / "perturb.png").stat().st_size > 0


def test_compression_benchmark_builds_and_measures_every_variant(tiny_classifier, tmp_path):
    out = tmp_path / "compression"
    data = tiny_classifier.parents[1] / "labelled.h5ad"
    command = [sys.executable, "-m", "benchmarks.compression", "--teacher", str(tiny_classifier), "--split",
               str(tiny_classifier.parent / "split.json"), "--data", str(data), "--ternary_steps", "2", "--rounds", "2",
               "--threads", "1", "--output_dir", str(out), "--results_dir", str(out / "results"), "--",
               "--max_steps", "2", "--num_workers", "0", "--cache_dir", str(tmp_path / "cache")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads((out / "results" / "compression.json").read_text())["variants"]
    assert list(measured) == ["float32", "int8", "distilled", "int8 distilled", "bfloat16", "bfloat16 distilled",
                              "ternary"]
    assert measured["float32"]["same_type_as_float32"] == 1.0
    assert measured["distilled"]["parameters"] < measured["float32"]["parameters"]
    assert measured["ternary"]["file_bytes"] < measured["float32"]["file_bytes"]
    assert measured["bfloat16"]["file_bytes"] < 0.6 * measured["float32"]["file_bytes"]
    for row in measured.values():
        assert len(row["seconds_per_pass"]) == 2 and row["cells_per_second"] > 0 and row["peak_rss_mb"] > 0
        assert 0 <= row["macro_f1"] <= 1
    assert "| int8 distilled |" in (out / "results" / "compression.md").read_text()


def test_compression_panel_keeps_the_most_variable_genes_of_every_cell(baron_small, tmp_path):
    import anndata
    import scanpy as sc

    from benchmarks.compression import write_panel

    source = tmp_path / "cells.h5ad"
    baron_small.write_h5ad(source)
    path = write_panel(str(source), 300, tmp_path / "out")
    panel = anndata.read_h5ad(path)
    assert path.endswith("panel_300.h5ad") and panel.shape == (baron_small.n_obs, 300)
    logged = sc.pp.log1p(sc.pp.normalize_total(baron_small, target_sum=1e4, copy=True), copy=True)
    variable = sc.pp.highly_variable_genes(logged, n_top_genes=300, inplace=False)["highly_variable"].to_numpy()
    assert list(panel.var_names) == list(baron_small.var_names[variable])  # scanpy's choice, in the data's order
    assert (panel.X != baron_small[:, panel.var_names].X).nnz == 0  # raw counts, untouched
    assert write_panel(str(source), 300, tmp_path / "out") == path  # built once, then reused


def test_every_benchmark_command_in_the_docs_starts():
    """`python benchmarks/x.py` puts benchmarks/ on sys.path, not the repository root, so a script that imports the
    benchmarks package fails that way; the docs must name each script as it runs (else `python -m benchmarks.x`)."""
    import re

    docs = [ROOT / "README.md", *ROOT.glob("benchmarks/**/*.md"), *ROOT.glob("checkpoints/**/*.md"),
            *ROOT.glob("benchmarks/*.py")]
    commands = {match for path in docs for match in re.findall(r"python (benchmarks/\w+\.py|-m benchmarks\.\w+)",
                                                                  path.read_text())}
    scripts = sorted(c for c in commands if c.endswith(".py"))
    modules = sorted(c.split(".")[-1] for c in commands if c.startswith("-m"))
    assert scripts and modules
    assert all((ROOT / "benchmarks" / f"{name}.py").exists() for name in modules), modules
    for script in scripts:  # `-m` puts the root on sys.path; a script run by path does not
        out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, f"python {script} --help: {out.stderr[-1500:]}"


def test_the_converged_baseline_is_one_fit_whatever_the_solvers_order(tmp_path):
    """benchmarks/baseline_convergence.py reads its converged column as the baseline free of liblinear's shuffle:
    two seeds, and the columns laid out as the checkpoint's vocabulary, must give the same fit on a real fold."""
    from benchmarks.baseline_convergence import CHECKPOINT, CONVERGED_TOLERANCE, fit_baseline
    from benchmarks.celltypist_cv import fold_args, load_labelled_cells
    from tokenization import GeneExpressionTokenizer
    from train import finetune
    from train.genes import add_data_genes

    path, label_key, adata, names, labels, own = load_labelled_cells("pbmc68k_reduced", tmp_path)
    split = finetune.split_cells(labels, names, fold_args(path, label_key, 5)[0])
    checkpoint = GeneExpressionTokenizer.from_pretrained(CHECKPOINT)
    add_data_genes(checkpoint, adata)
    laid_out = checkpoint.encode_matrix(adata)
    assert laid_out.shape[1] > own.shape[1]
    fits = [fit_baseline(own, labels, names, split, (0.1, 1.0), 0, CONVERGED_TOLERANCE),
            fit_baseline(own, labels, names, split, (0.1, 1.0), 1, CONVERGED_TOLERANCE),
            fit_baseline(laid_out, labels, names, split, (0.1, 1.0), 1, CONVERGED_TOLERANCE)]
    assert fits[0] == fits[1] == fits[2]

"""`scbert annotate` and `annotate()`: every supported file format, streaming, unassigned cells, novelty columns, and
a clear error for each bad input. A tiny classifier is fine-tuned once on real Baron cells (3 types, 300 genes; the
`tiny_classifier` fixture of conftest.py)."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from conftest import CLASSIFIER_CLASSES as CLASSES
from train.annotate import UNASSIGNED, annotate, annotate_file, main
from train.novelty import DEFAULT_SCORE

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("scbert_cell_type", "scbert_confidence", "scbert_is_novel", "scbert_novelty_score",
           "scbert_unassigned_reason", "scbert_genes")


@pytest.fixture(scope="module")
def cells(classifier_cells) -> ad.AnnData:
    return classifier_cells


@pytest.fixture(scope="module")
def classifier(tiny_classifier) -> Path:
    return tiny_classifier


@pytest.fixture
def with_odd_cells(cells) -> ad.AnnData:
    """The cells plus one with no counts at all and one with counts in only 3 genes, in the middle."""
    X = sp.csr_matrix(cells.X).toarray()
    few = np.zeros(X.shape[1], dtype=np.float32)
    few[np.flatnonzero(X[0])[:3]] = 5
    X = np.vstack([X[:50], np.zeros((1, X.shape[1]), np.float32), few[None], X[50:]])
    obs = pd.DataFrame({"cell_type1": list(cells.obs["cell_type1"][:50]) + ["none", "few"]
                        + list(cells.obs["cell_type1"][50:])},
                       index=list(cells.obs_names[:50]) + ["empty_cell", "three_genes"] + list(cells.obs_names[50:]))
    return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=cells.var[[]].copy())


def test_annotate_streams_an_h5ad_and_returns_every_cell_in_order(classifier, with_odd_cells, tmp_path, capsys):
    source = tmp_path / "cells.h5ad"
    with_odd_cells.write_h5ad(source)
    summary = main([str(source), "--model", str(classifier), "--output", str(tmp_path / "out.h5ad"),
                    "--chunk-size", "17", "--batch-size", "8", "--no-progress-bar"])
    printed = capsys.readouterr().out
    assert "flagged as a type the model was not trained on" in printed and "cells/s" in printed
    assert "and class_scaled_knn > " in printed  # the gate is part of the rule printed

    annotated = ad.read_h5ad(tmp_path / "out.h5ad")
    assert list(annotated.obs_names) == list(with_odd_cells.obs_names)
    assert (annotated.X != with_odd_cells.X).nnz == 0 and list(annotated.obs["cell_type1"]) == list(with_odd_cells.obs["cell_type1"])
    assert all(column in annotated.obs for column in COLUMNS)
    odd = annotated.obs.loc[["empty_cell", "three_genes"]]
    assert list(odd["scbert_cell_type"]) == [UNASSIGNED, UNASSIGNED]
    assert list(odd["scbert_unassigned_reason"]) == ["expresses no vocabulary gene",
                                                    "3 vocabulary genes expressed (min_genes=10)"]
    assert odd["scbert_confidence"].isna().all() and not odd["scbert_is_novel"].any()
    known = annotated.obs.drop(index=["empty_cell", "three_genes"])
    assert set(known["scbert_cell_type"]) <= set(CLASSES) and (known["scbert_unassigned_reason"] == "").all()
    assert np.isfinite(annotated.obsm["X_scbert"][annotated.obs["scbert_cell_type"] != UNASSIGNED]).all()
    assert summary["unassigned"] == 2 and summary["cells"] == with_odd_cells.n_obs
    novelty = annotated.uns["scbert"]["novelty"]
    assert novelty["score"] == DEFAULT_SCORE and novelty["gate_score"] == "class_scaled_knn"
    # A flagged cell is above the threshold; the gate can only leave a cell above it unflagged.
    assert (known.loc[known["scbert_is_novel"], "scbert_novelty_score"] > novelty["threshold"]).all()
    assert "raw counts detected" in annotated.uns["scbert"]["normalization"]

    # The same cells in memory, in one chunk: the same answers, whatever the chunking.
    in_memory = annotate(with_odd_cells.copy(), classifier, chunk_size=1000)
    for column in ("scbert_cell_type", "scbert_is_novel", "scbert_unassigned_reason"):
        assert list(in_memory.obs[column]) == list(annotated.obs[column])
    np.testing.assert_allclose(in_memory.obs["scbert_novelty_score"], annotated.obs["scbert_novelty_score"],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(in_memory.obsm["X_scbert"], annotated.obsm["X_scbert"], atol=1e-4)


def test_log_normalised_input_gets_the_raw_counts_answers(classifier, cells):
    import scanpy as sc

    logged = cells.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    raw, log = annotate(cells.copy(), classifier), annotate(logged, classifier)
    assert list(raw.obs["scbert_cell_type"]) == list(log.obs["scbert_cell_type"])
    # Not bit-equal: at 64 tokens per cell, genes tied on counts are cut by value, and float rounding reorders ties.
    np.testing.assert_allclose(raw.obs["scbert_confidence"], log.obs["scbert_confidence"], atol=0.05)
    assert "log-normalised values detected" in log.uns["scbert"]["normalization"]


def write_10x_folder(adata: ad.AnnData, folder: Path) -> None:
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as handle:
        scipy.io.mmwrite(handle, sp.csr_matrix(adata.X).T.astype(np.int64).tocoo())
    features = pd.DataFrame({"id": [f"id{i}" for i in range(adata.n_vars)], "name": adata.var_names,
                             "type": "Gene Expression"})
    features.to_csv(folder / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(adata.obs_names).to_csv(folder / "barcodes.tsv.gz", header=False, index=False)


def write_10x_h5(adata: ad.AnnData, path: Path) -> None:
    """Cell Ranger v3's layout: a genes x cells CSC matrix (i.e. cells x genes CSR) under /matrix."""
    X = sp.csr_matrix(adata.X).astype(np.int32)
    with h5py.File(path, "w") as handle:
        group = handle.create_group("matrix")
        group["data"], group["indices"], group["indptr"] = X.data, X.indices, X.indptr
        group["shape"] = np.array([adata.n_vars, adata.n_obs])
        group["barcodes"] = np.array(adata.obs_names, dtype="S")
        features = group.create_group("features")
        features["name"] = np.array(adata.var_names, dtype="S")
        features["id"] = np.array([f"id{i}" for i in range(adata.n_vars)], dtype="S")
        features["feature_type"] = np.array(["Gene Expression"] * adata.n_vars, dtype="S")
        features["genome"] = np.array(["mm10"] * adata.n_vars, dtype="S")


def test_bfloat16_batches_come_in_few_lengths_and_padding_changes_no_answer(classifier, cells, monkeypatch):
    import torch

    from train import annotate as annotate_module
    from train.annotate import load_classifier, padding_multiple, run_model

    model, tokenizer = load_classifier(classifier, "cpu")
    assert padding_multiple(model, tokenizer) is None
    model = model.to(torch.bfloat16)
    assert padding_multiple(model, tokenizer) == 32
    X = tokenizer.encode_matrix(cells)
    lengths, real_collate = [], tokenizer.collate

    def recording_collate(*args, **kwargs):
        batch = real_collate(*args, **kwargs)
        lengths.append(batch["input_ids"].shape[1])
        return batch

    monkeypatch.setattr(tokenizer, "collate", recording_collate)
    padded = run_model(model, tokenizer, X, batch_size=16)
    assert lengths and all(length % 32 == 0 for length in lengths)
    monkeypatch.setattr(annotate_module, "padding_multiple", lambda model, tokenizer: None)
    unpadded = run_model(model, tokenizer, X, batch_size=16)
    np.testing.assert_array_equal(padded[0].argmax(-1), unpadded[0].argmax(-1))
    np.testing.assert_allclose(padded[0], unpadded[0], atol=0.05)  # bfloat16 sums in another order, nothing more
    np.testing.assert_allclose(padded[1], unpadded[1], atol=0.05)


def test_the_batch_size_changes_no_answer(classifier, cells):
    """The default batch size is a speed setting: cells one at a time (no padding) get the same logits and
    embeddings, in the input's order."""
    from train.annotate import BATCH_SIZE, load_classifier, run_model

    model, tokenizer = load_classifier(classifier, "cpu")
    X = tokenizer.encode_matrix(cells)
    assert X.shape[0] > BATCH_SIZE
    batched, alone = run_model(model, tokenizer, X, BATCH_SIZE), run_model(model, tokenizer, X, 1)
    np.testing.assert_allclose(batched[0], alone[0], atol=1e-4)
    np.testing.assert_allclose(batched[1], alone[1], atol=1e-4)


def test_every_supported_format_gives_the_same_annotation(classifier, cells, tmp_path):
    reference = annotate(cells.copy(), classifier).obs["scbert_cell_type"].astype(str).tolist()
    table = pd.DataFrame(sp.csr_matrix(cells.X).toarray(), index=cells.obs_names, columns=cells.var_names)
    write_10x_folder(cells, tmp_path / "filtered_feature_bc_matrix")
    write_10x_h5(cells, tmp_path / "filtered_feature_bc_matrix.h5")
    table.to_csv(tmp_path / "cells_by_genes.csv")
    table.T.to_csv(tmp_path / "genes_by_cells.tsv.gz", sep="\t")  # orientation detected from the names
    inputs = ["filtered_feature_bc_matrix", "filtered_feature_bc_matrix.h5", "cells_by_genes.csv", "genes_by_cells.tsv.gz"]
    for i, name in enumerate(inputs):
        output = tmp_path / f"out{i}.h5ad"
        annotate_file(tmp_path / name, classifier, output, progress=False)
        annotated = ad.read_h5ad(output)
        assert list(annotated.obs_names) == list(cells.obs_names), name
        assert annotated.obs["scbert_cell_type"].astype(str).tolist() == reference, name


def test_bad_inputs_fail_with_a_clear_message(classifier, cells, tmp_path):
    def fails(path, match, model=classifier, output=None, **kwargs):
        with pytest.raises((ValueError, FileNotFoundError, FileExistsError), match=match):
            annotate_file(path, model, output or tmp_path / "out.h5ad", progress=False, **kwargs)

    good = tmp_path / "good.h5ad"
    cells.write_h5ad(good)
    (tmp_path / "cells.xlsx").write_bytes(b"PK\x03\x04")
    fails(tmp_path / "cells.xlsx", "not a supported file")
    truncated = tmp_path / "truncated.h5ad"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    fails(truncated, "truncated file")
    (tmp_path / "empty.csv").write_bytes(b"")
    fails(tmp_path / "empty.csv", "is empty")
    table = pd.DataFrame(sp.csr_matrix(cells.X).toarray(), index=cells.obs_names, columns=cells.var_names)
    text = table.copy().astype(object)
    text.iloc[3, 5] = "high"
    text.to_csv(tmp_path / "words.csv")
    fails(tmp_path / "words.csv", r"non-numeric values: column .*'high'")
    negative = table.copy()
    negative.iloc[2, 4] = -3.0
    negative.to_csv(tmp_path / "negative.csv")
    fails(tmp_path / "negative.csv", "negative values")
    missing = table.copy()
    missing.iloc[2, 4] = np.nan
    missing.to_csv(tmp_path / "nan.csv")
    fails(tmp_path / "nan.csv", "NaN or infinite values")
    strangers = table.copy()
    strangers.columns = [f"feature_{i}" for i in range(table.shape[1])]
    strangers.to_csv(tmp_path / "strangers.csv")
    fails(tmp_path / "strangers.csv", "Too few genes match the vocabulary")
    fails(good, "without a cell type classification head.*scbert finetune --model",
          model=ROOT / "checkpoints" / "scbert2-small")
    fails(good, "not a model folder", model=tmp_path)
    (tmp_path / "taken.h5ad").write_bytes(b"keep me")
    fails(good, "already exists: pass --overwrite", output=tmp_path / "taken.h5ad")
    assert (tmp_path / "taken.h5ad").read_bytes() == b"keep me"
    fails(good, "output directory .* does not exist", output=tmp_path / "no" / "such" / "out.h5ad")
    fails(good, "must end in .h5ad", output=tmp_path / "out.csv")
    assert not list(tmp_path.glob("*.partial"))

    annotate_file(good, classifier, tmp_path / "taken.h5ad", overwrite=True, progress=False)
    assert ad.read_h5ad(tmp_path / "taken.h5ad").n_obs == cells.n_obs


def test_the_scbert_command_prints_an_error_not_a_traceback(classifier, tmp_path):
    (tmp_path / "cells.loom").write_bytes(b"x")
    done = subprocess.run([sys.executable, "-m", "train.cli", "annotate", str(tmp_path / "cells.loom"), "--model",
                           str(classifier), "--output", str(tmp_path / "out.h5ad")], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 1 and "error:" in done.stderr and "Supported inputs" in done.stderr
    assert "Traceback" not in done.stderr


def test_speed_benchmark_streams_resampled_cells_and_reports_memory(classifier, tmp_path):
    import json

    out = tmp_path / "speed"
    command = [sys.executable, "-m", "benchmarks.annotate_speed", "--model", str(classifier), "--sizes", "150",
               "--output_dir", str(out), "--results_dir", str(out / "results"), "--name", "tiny"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads((out / "results" / "annotate_speed_tiny.json").read_text())["runs"]
    assert row["cells"] == 150 and row["cells_per_second"] > 0 and row["peak_rss_mb"] > 0
    resampled = ad.read_h5ad(out / "cells_150.h5ad")
    assert resampled.shape[0] == 150 and resampled.n_vars == 14877  # every Baron gene, real profiles
    assert ad.read_h5ad(out / "annotated_150.h5ad").obs["scbert_cell_type"].notna().all()

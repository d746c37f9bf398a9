"""The pretraining corpus on small slices of the real corpus files: QC, one vocabulary across panels and species,
panel-aware unexpressed genes, a tiny corpus pretraining run with held-out scores, the release folder, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from tests.conftest import DATA_DIR
from train import pretrain, release
from train.corpus import QCSettings, build_corpus, corpus_files
from train.data import LengthGroupedSampler, MaskedExpressionCollator

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
PBMC3K = DATA_DIR / "pretrain" / "pbmc3k_10x.h5ad"
PAPALEXI = DATA_DIR / "perturbseq" / "papalexi2021_thp1_lowmoi.h5ad"


@pytest.fixture(scope="module")
def corpus_dir(baron, tmp_path_factory):
    """Three small real files: 10x PBMCs (human, 3,000 genes), Papalexi's 299-gene panel, Baron (mouse)."""
    if not PBMC3K.exists() or not PAPALEXI.exists():
        pytest.skip(f"corpus files not found under {DATA_DIR}")
    folder = tmp_path_factory.mktemp("corpus")
    pbmc = ad.read_h5ad(PBMC3K)
    detected = np.asarray((pbmc.X > 0).sum(axis=0)).ravel()
    pbmc[:120, np.sort(np.argsort(-detected)[:3000])].copy().write_h5ad(folder / "pbmc.h5ad")
    ad.read_h5ad(PAPALEXI)[:150].copy().write_h5ad(folder / "papalexi.h5ad")
    baron[:80].copy().write_h5ad(folder / "baron.h5ad")
    return folder


def small_settings(**overrides) -> QCSettings:
    return QCSettings(**{"min_genes": 200, "min_cells_per_vocab_gene": 5, **overrides})


def test_qc_vocabulary_and_panels(corpus_dir, tmp_path):
    corpus = build_corpus([str(corpus_dir)], small_settings(), max_length=64, cache_dir=tmp_path, log=lambda *_: None)
    files = {Path(f["file"]).name: f for f in corpus.report["files"]}
    assert files["baron.h5ad"]["species"] == "mouse" and files["pbmc.h5ad"]["species"] == "human"
    # Papalexi is a targeted panel: its cells are judged by the targeted threshold, not by 200 genes.
    assert files["papalexi.h5ad"]["targeted_panel"] and files["papalexi.h5ad"]["min_genes"] == 20
    for f in files.values():
        assert f["cells_kept"] + f["dropped_few_genes"] + f["dropped_mito"] == f["cells_in"]
    assert len(corpus.dataset) == sum(f["cells_kept"] for f in files.values())
    # Human symbols only: mouse genes arrive through their one-to-one human orthologs.
    assert all(g == g.upper() for g in corpus.tokenizer.genes)
    assert "GCG" in corpus.tokenizer.genes  # a mouse pancreas marker (Gcg), via its human ortholog
    # Each cell's genes lie inside its own file's panel, and the panels differ in size.
    panels = corpus.panels
    for row in corpus.dataset.select(range(0, len(corpus.dataset), 17)):
        assert np.isin(row["gene_ids"], panels[row["panel"]]).all()
    assert sorted(len(p) for p in panels)[0] < 300 < sorted(len(p) for p in panels)[-1]
    # A second build is read from the cache.
    again = build_corpus([str(corpus_dir)], small_settings(), max_length=64, cache_dir=tmp_path, log=print)
    assert again.tokenizer.genes == corpus.tokenizer.genes and len(again.dataset) == len(corpus.dataset)


def test_unexpressed_genes_come_from_the_cells_own_panel(corpus_dir, tmp_path):
    corpus = build_corpus([str(corpus_dir)], small_settings(), max_length=None, cache_dir=tmp_path, log=lambda *_: None)
    papalexi = [i for i, f in enumerate(corpus.report["files"]) if "papalexi" in f["file"]][0]
    rows = [i for i, p in enumerate(corpus.dataset["panel"]) if p == papalexi][:8]
    cells = [{**corpus.dataset[i], "index": i} for i in rows]
    collator = MaskedExpressionCollator(corpus.tokenizer, seed=0, zero_fraction=1.0, panels=corpus.panels)
    batch = collator(cells)
    real = batch["attention_mask"].bool() & (batch["input_ids"] >= corpus.tokenizer.num_special_tokens)
    zeros = real & (batch["value_labels"] == 0)
    assert zeros.sum() > 0
    assert np.isin(batch["input_ids"][zeros].numpy(), corpus.panels[papalexi]).all()
    # Without the panels the same cells draw zeros from the whole vocabulary, mostly genes Papalexi never measured.
    unaware = MaskedExpressionCollator(corpus.tokenizer, seed=0, zero_fraction=1.0)(cells)
    zeros = (unaware["attention_mask"].bool() & (unaware["value_labels"] == 0)
             & (unaware["input_ids"] >= corpus.tokenizer.num_special_tokens))
    assert not np.isin(unaware["input_ids"][zeros].numpy(), corpus.panels[papalexi]).all()


def test_corpus_pretraining_scores_held_out_cells_and_releases_a_folder(corpus_dir, tmp_path):
    output = tmp_path / "run"
    args = ["--corpus", str(corpus_dir), "--architecture", "scbert2-tiny", "--max_length", "64", "--min_genes", "200",
            "--min_cells_per_vocab_gene", "5", "--held_out", "0.1", "--max_steps", "6", "--eval_steps", "3",
            "--logging_steps", "2", "--per_device_batch_size", "16", "--output_dir", str(output),
            "--cache_dir", str(tmp_path / "cache"), "--no_progress_bar", "--num_workers", "0",
            "--file_sampling_exponent", "0"]
    pretrain.main(args)
    summary = json.loads((output / "pretrain_summary.json").read_text())
    assert summary["held_out_cells"] > 0 and summary["cells"] + summary["held_out_cells"] == summary["corpus"]["cells"]
    # Exponent 0: every file a third of the draws, whatever its cells; recorded with the corpus.
    shares = summary["corpus"]["file_sampling"]["shares"]
    assert sorted(shares) == ["baron.h5ad", "papalexi.h5ad", "pbmc.h5ad"]
    assert list(shares.values()) == pytest.approx([1 / 3] * 3, abs=1e-4)
    assert 0 <= summary["held_out"]["masked_accuracy"] <= 1 and summary["held_out"]["masked_value_mse"] > 0
    records = [json.loads(line) for line in (output / "logs" / "pretrain.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_masked_accuracy" in r] == [3, 6, 6]  # every 3 steps + end of epoch
    assert all(r["tokens_per_second"] > r["cells_per_second"] > 0 for r in records if "tokens_per_second" in r)

    folder = release.main(["--run", str(output), "--output", str(tmp_path / "release"), "--dtype", "bfloat16"])
    saved = json.loads((folder / "release.json").read_text())
    assert saved["stored_dtype"] == "bfloat16"
    # The recomputed float32 scores are the run's own held-out scores: same cells, same masks.
    for key, value in summary["held_out"].items():
        assert saved["held_out_scores"]["float32"][key] == pytest.approx(value, abs=1e-6)
    assert (folder / "README.md").exists() and (folder / "pretraining_corpus.json").exists()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pkl"))
    # A fresh interpreter, without the package on its path, loads it as float32 with every Auto class used here.
    code = ("from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer; import sys; f = sys.argv[1]; "
            "m = AutoModel.from_pretrained(f, trust_remote_code=True); "
            "AutoModelForMaskedLM.from_pretrained(f, trust_remote_code=True); "
            "t = AutoTokenizer.from_pretrained(f, trust_remote_code=True); "
            "print(next(m.parameters()).dtype, t.vocab_size)")
    out = subprocess.run([sys.executable, "-I", "-c", code, str(folder)], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["torch.float32", str(summary["corpus"]["vocabulary_size"] + 3)]


def test_file_sampling_shares_follow_the_exponent_and_the_sampler_draws_them():
    panel = np.repeat([0, 1, 2], [900, 100, 0])  # file 2 lost every cell to QC
    weights, shares = pretrain.file_sampling_weights(panel, 3, 1.0)
    assert weights is None and shares == pytest.approx([0.9, 0.1, 0.0])
    _, shares = pretrain.file_sampling_weights(panel, 3, 0.5)
    assert shares == pytest.approx([0.75, 0.25, 0.0])  # sqrt(900) : sqrt(100)
    weights, shares = pretrain.file_sampling_weights(panel, 3, 0.0)
    assert shares == pytest.approx([0.5, 0.5, 0.0])
    sampler = LengthGroupedSampler(np.full(len(panel), 10), 16, seed=0, weights=weights)
    drawn = panel[list(sampler)]
    assert len(drawn) == len(panel) and 0.44 < (drawn == 1).mean() < 0.56


@pytest.mark.parametrize("flags, message", [
    (["--corpus", "x.h5ad", "--file_sampling_exponent", "1.5"], "must be in \\[0, 1\\]"),
    (["--data", "x.h5ad", "--file_sampling_exponent", "0.3"], "balances the files of a --corpus"),
])
def test_file_sampling_refuses_an_exponent_outside_0_1_and_data_without_files(flags, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        pretrain.main([*flags, "--output_dir", str(tmp_path / "run")])


def test_scbert_v1_corpus_masks_genes_a_file_did_not_measure(corpus_dir, tmp_path):
    corpus = build_corpus([str(corpus_dir)], small_settings(min_panel_genes=20), cache_dir=tmp_path,
                          log=lambda *_: None, panel_genes=150)
    tokenizer = corpus.tokenizer
    assert tokenizer.mode == "scbert" and 150 <= tokenizer.num_genes <= 300
    assert corpus.report["panel"] == {"requested_genes": 150, "genes": tokenizer.num_genes,
                                      "from_vocabulary_of": corpus.report["panel"]["from_vocabulary_of"]}
    papalexi = [i for i, f in enumerate(corpus.report["files"]) if "papalexi" in f["file"]][0]
    measured = corpus.panels[papalexi] - tokenizer.num_special_tokens
    assert 0 < len(measured) < tokenizer.num_genes
    rows = [i for i, p in enumerate(corpus.dataset["panel"]) if p == papalexi][:8]
    cells = [{**corpus.dataset[i], "index": i} for i in rows]
    mask = tokenizer.num_bins + 1
    batch = MaskedExpressionCollator(tokenizer, seed=0, panels=corpus.panels)(cells)
    unmeasured = np.setdiff1d(np.arange(tokenizer.num_genes), measured)
    assert (batch["input_ids"][:, unmeasured] == mask).all()
    assert (batch["input_ids"][:, -1] == 0).all()  # scBERT's trailing extra token is kept
    assert (batch["labels"][:, unmeasured] == -100).all() and (batch["labels"] != -100).any()
    # Without the panels the same genes read as observed zeros (bin 0).
    unaware = MaskedExpressionCollator(tokenizer, seed=0)(cells)
    assert (unaware["input_ids"][:, unmeasured] == 0).all()


def test_scbert_v1_corpus_pretraining_releases_a_folder(corpus_dir, tmp_path):
    output = tmp_path / "run"
    base = ["--corpus", str(corpus_dir), "--min_genes", "200", "--min_cells_per_vocab_gene", "5", "--held_out", "0.1",
            "--min_panel_genes", "20",
            "--max_steps", "2", "--logging_steps", "1", "--per_device_batch_size", "8", "--output_dir", str(output),
            "--cache_dir", str(tmp_path / "cache"), "--no_progress_bar", "--num_workers", "0"]
    with pytest.raises(ValueError, match="--panel_genes sizes a scBERT v1 panel"):
        pretrain.main(base + ["--architecture", "scbert2-tiny", "--panel_genes", "100"])
    with pytest.raises(ValueError, match=r"--config_overrides: \['no_such_field'\] are not fields of the scbert"):
        pretrain.main(base + ["--architecture", "scbert-small", "--config_overrides", "no_such_field=1"])
    pretrain.main(base + ["--architecture", "scbert-small", "--panel_genes", "100",
                          "--config_overrides", "feature_redraw_interval=null,depth=1"])
    summary = json.loads((output / "pretrain_summary.json").read_text())
    assert 0 <= summary["held_out"]["masked_accuracy"] <= 1 and "masked_value_mse" not in summary["held_out"]
    folder = release.main(["--run", str(output), "--output", str(tmp_path / "release")])
    saved = json.loads((folder / "release.json").read_text())
    for key, value in summary["held_out"].items():
        assert saved["held_out_scores"]["float32"][key] == pytest.approx(value, abs=1e-6)
    card = (folder / "README.md").read_text()
    saved_config = json.loads((folder / "config.json").read_text())
    assert saved_config["feature_redraw_interval"] is None and saved_config["depth"] == 1
    assert "scBERT v1 (Performer, 1 layer," in card and "highly variable human genes" in card and "nan" not in card
    code = ("from transformers import AutoModelForMaskedLM, AutoTokenizer; import sys; f = sys.argv[1]; "
            "m = AutoModelForMaskedLM.from_pretrained(f, trust_remote_code=True); "
            "t = AutoTokenizer.from_pretrained(f, trust_remote_code=True); print(t.mode, m.config.max_seq_len)")
    out = subprocess.run([sys.executable, "-I", "-c", code, str(folder)], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    genes = summary["corpus"]["panel"]["genes"]
    assert out.stdout.split()[-2:] == ["scbert", str(genes + 1)]


# ------------------------------------------------------------------------------------------------- bad input
def test_a_file_sharing_too_few_genes_is_refused(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match="papalexi.h5ad shares only .* genes with the corpus vocabulary"):
        build_corpus([str(corpus_dir)], small_settings(min_panel_genes=500), cache_dir=tmp_path, log=lambda *_: None)


def test_normalised_values_where_counts_are_expected_and_the_reverse(corpus_dir, tmp_path):
    import scanpy as sc

    cells = ad.read_h5ad(corpus_dir / "pbmc.h5ad")
    sc.pp.normalize_total(cells)
    sc.pp.log1p(cells)
    cells.write_h5ad(tmp_path / "lognorm.h5ad")
    with pytest.raises(ValueError, match="non-integer values .* looks normalised.* --corpus_values normalized"):
        build_corpus([str(tmp_path / "lognorm.h5ad"), str(corpus_dir / "papalexi.h5ad")], small_settings(),
                     cache_dir=tmp_path)
    with pytest.raises(ValueError, match="only integer values: it looks like raw counts"):
        build_corpus([str(corpus_dir / "papalexi.h5ad"), str(corpus_dir / "pbmc.h5ad")],
                     small_settings(values="normalized"), cache_dir=tmp_path)


def test_a_file_whose_cells_all_fail_qc_is_named(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match=r"Every one of the 120 cells of .*pbmc.h5ad fails QC: 120 express fewer than "
                                         r"5000 genes"):
        build_corpus([str(corpus_dir / "pbmc.h5ad"), str(corpus_dir / "baron.h5ad")], small_settings(min_genes=5000),
                     cache_dir=tmp_path)


def test_a_corpus_of_one_file_warns_and_missing_paths_fail(corpus_dir, tmp_path):
    with pytest.warns(UserWarning, match="The corpus is a single file"):
        assert corpus_files([str(corpus_dir / "pbmc.h5ad")]) == [corpus_dir / "pbmc.h5ad"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        corpus_files([str(tmp_path / "nope.h5ad")])
    with pytest.raises(FileNotFoundError, match="holds no .h5ad files"):
        corpus_files([str(tmp_path)])
    with pytest.raises(ValueError, match="named twice"):
        corpus_files([str(corpus_dir), str(corpus_dir / "pbmc.h5ad")])


def test_corpus_refuses_a_panel_of_one_gene_and_a_continued_model(corpus_dir, tmp_path):
    base = ["--corpus", str(corpus_dir), "--output_dir", str(tmp_path / "o"), "--cache_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="--panel_genes must be at least 2"):
        pretrain.main(base + ["--architecture", "scbert-small", "--panel_genes", "1"])
    with pytest.raises(SystemExit):  # --corpus and --data are exclusive
        pretrain.main(base + ["--data", str(corpus_dir / "pbmc.h5ad")])


SHIPPED = sorted(p for p in (Path(__file__).resolve().parents[1] / "checkpoints").iterdir() if (p / "config.json").exists())


@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_checkpoints_load_with_and_without_the_package(folder, tmp_path, baron_small):
    """The release folders in the repository: AutoModel with the package and as remote code in a fresh interpreter
    give the same cell embeddings on real cells, as float32, from safetensors only."""
    from transformers import AutoModel, AutoTokenizer

    import modeling_scbert  # noqa: F401
    import tokenization  # noqa: F401

    assert not [p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]
    assert (folder / "model.safetensors").stat().st_size <= 25 * 2**20
    release = json.loads((folder / "release.json").read_text())
    assert release["pretraining"]["corpus"]["cells"] > 5_000 and (folder / "README.md").exists()
    cells = baron_small[:8].copy()
    cells.write_h5ad(tmp_path / "cells.h5ad")
    model, tokenizer = AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert next(model.parameters()).dtype == torch.float32
    with torch.inference_mode():
        expected = model(**tokenizer(cells, return_tensors="pt")).last_hidden_state[:, 0].numpy()
    code = ("import sys, anndata, numpy, torch; from transformers import AutoModel, AutoTokenizer; f = sys.argv[1]; "
            "m = AutoModel.from_pretrained(f, trust_remote_code=True); "
            "t = AutoTokenizer.from_pretrained(f, trust_remote_code=True); "
            "b = t(anndata.read_h5ad(sys.argv[2]), return_tensors='pt'); "
            "numpy.save(sys.argv[3], m(**b).last_hidden_state[:, 0].detach().numpy())")
    out = subprocess.run([sys.executable, "-I", "-c", code, str(folder), str(tmp_path / "cells.h5ad"),
                          str(tmp_path / "out.npy")], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)


@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_remote_code_is_the_packages_own(folder):
    """A Hub user runs the folder's copies of the code (trust_remote_code); they must be the package's files, which
    the tests exercise, not an older version left behind when the package changed."""
    root = Path(__file__).resolve().parents[1]
    copies = sorted(folder.glob("*.py"))
    assert copies, f"{folder} ships no remote code"
    for copy in copies:
        sources = [p for p in (root / "modeling_scbert" / copy.name, root / "tokenization" / copy.name) if p.exists()]
        assert len(sources) == 1, f"{copy} has no single source file in modeling_scbert/ or tokenization/"
        assert copy.read_bytes() == sources[0].read_bytes(), (
            f"{copy} differs from {sources[0]}: copy the source over it (or rebuild with checkpoints/build.sh)")

"""A saved model folder is self-contained Hub remote code: with trust_remote_code=True, a process that cannot import
this package loads it with AutoTokenizer and every Auto class (configuration, modeling and tokenizer files and the
gene tables travel with it) and gets the package's outputs on real cells.

That process (``python -I``, another working directory) runs this file's `run_without_package`, which blocks the
package's imports first: that is why the tests import the package inside their bodies rather than at the top.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

PACKAGES = ("modeling_scbert", "tokenization", "train")
AUTO_MODEL_CLASSES = (AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification)
AUTO_CLASS_NAMES = ["AutoConfig"] + [auto.__name__ for auto in AUTO_MODEL_CLASSES]
PBMC3K_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain" / "pbmc3k_10x.h5ad"
# Input sets: (cells file, gene_key). pbmc3k's symbols reach the mouse vocabulary through the ortholog table, its
# Ensembl ids (var.gene_ids) through the GENCODE table and then the ortholog table.
CASES = {
    "baron": ("baron.h5ad", None),
    "pbmc3k_symbols": ("pbmc3k.h5ad", None),
    "pbmc3k_ensembl": ("pbmc3k.h5ad", "gene_ids"),
}


class PackageBlocker:
    """A meta path finder that makes this package unimportable, although the editable install puts it on the path."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in PACKAGES:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the folder must load without it)", name=name)
        return None


def folder_outputs(folder, cells_dir, trust_remote_code):
    """Tokenizer inputs and the output of every Auto class on every case, and the modules their classes come from."""
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    models = {}
    for auto in AUTO_MODEL_CLASSES:
        torch.manual_seed(0)  # a classifier's folder lacks the masked-LM head: both processes draw the same one
        models[auto.__name__] = auto.from_pretrained(folder, trust_remote_code=trust_remote_code).eval()
    modules = {"AutoTokenizer": type(tokenizer).__module__, "AutoConfig": type(config).__module__}
    modules.update({name: type(model).__module__ for name, model in models.items()})
    arrays = {}
    for case, (file_name, gene_key) in CASES.items():
        batch = tokenizer(ad.read_h5ad(Path(cells_dir) / file_name), gene_key=gene_key, return_tensors="pt")
        arrays.update({f"{case}.inputs.{key}": value.numpy() for key, value in batch.items()})
        with torch.no_grad():
            for name, model in models.items():
                # The first output: hidden states, masked-LM logits or classifier logits (no labels, so no loss).
                arrays[f"{case}.{name}"] = model(**batch).to_tuple()[0].numpy()
    return arrays, modules


def run_without_package(folders, cells_dir, out_dir):
    sys.meta_path.insert(0, PackageBlocker)
    for package in PACKAGES:
        try:
            __import__(package)
        except ModuleNotFoundError:
            continue
        raise AssertionError(f"{package} is importable: the test would not show that the folder is self-contained")
    for folder in folders:
        arrays, modules = folder_outputs(folder, cells_dir, trust_remote_code=True)
        np.savez(Path(out_dir) / f"{Path(folder).name}.npz", **arrays)
        (Path(out_dir) / f"{Path(folder).name}.json").write_text(json.dumps(modules))


# --------------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def pbmc3k_cells():
    """The first 24 cells of 10x PBMC 3k: human symbols in var_names, Ensembl ids in var.gene_ids, raw counts."""
    if not PBMC3K_PATH.exists():
        pytest.skip(f"real data not found at {PBMC3K_PATH}")
    return ad.read_h5ad(PBMC3K_PATH, backed="r")[:24].to_memory()


@pytest.fixture(scope="module")
def baron_vocabulary(baron):
    """Baron's 1,000 most often detected genes (mouse symbols): a small vocabulary for tiny models."""
    detected = np.asarray((baron.X > 0).sum(axis=0)).ravel()
    return list(baron.var_names[np.sort(np.argsort(-detected, kind="stable")[:1000])])


CLASS_PRIOR, TAU = [0.6, 0.3, 0.1], 0.5  # a logit-adjusted classifier, as fine-tuning saves it by default


def save_tiny_folders(vocabulary, root):
    """A scBERT 2.0 and a scBERT v1 logit-adjusted classifier folder (tokenizer included), saved by the package."""
    import modeling_scbert
    from tokenization import GeneExpressionTokenizer

    torch.manual_seed(0)
    tokenizer = GeneExpressionTokenizer(genes=vocabulary, mode="scbert2", max_length=64)
    config = modeling_scbert.ScBert2Config.from_preset("scbert2-tiny", vocab_size=tokenizer.vocab_size, num_labels=3,
                                                       class_prior=CLASS_PRIOR, logit_adjustment_tau=TAU)
    modeling_scbert.ScBert2ForSequenceClassification(config).save_pretrained(root / "scbert2")
    tokenizer.save_pretrained(root / "scbert2")

    tokenizer = GeneExpressionTokenizer(genes=vocabulary, mode="scbert")
    config = modeling_scbert.ScBertConfig(
        num_tokens=tokenizer.num_bins + 2, dim=16, depth=1, heads=2, dim_head=8, nb_features=8,
        max_seq_len=tokenizer.sequence_length, classifier_fc1_size=16, classifier_fc2_size=8, num_labels=3,
        class_prior=CLASS_PRIOR, logit_adjustment_tau=TAU,
    )
    modeling_scbert.ScBertForSequenceClassification(config).save_pretrained(root / "scbert")
    tokenizer.save_pretrained(root / "scbert")
    return [root / "scbert2", root / "scbert"]


def test_saved_folders_load_as_remote_code_without_the_package(baron, baron_vocabulary, pbmc3k_cells, tmp_path):
    folders = save_tiny_folders(baron_vocabulary, tmp_path / "folders")
    cells_dir, out_dir, work_dir = tmp_path / "cells", tmp_path / "out", tmp_path / "work"
    for path in (cells_dir, out_dir, work_dir):
        path.mkdir()
    baron[:24].to_memory().write_h5ad(cells_dir / "baron.h5ad")
    pbmc3k_cells.write_h5ad(cells_dir / "pbmc3k.h5ad")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    code = (
        f"import runpy; runpy.run_path({str(Path(__file__))!r}, run_name='hub_folder')['run_without_package']"
        f"({[str(f) for f in folders]!r}, {str(cells_dir)!r}, {str(out_dir)!r})"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=work_dir, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-5000:]

    for folder in folders:
        modules = json.loads((out_dir / f"{folder.name}.json").read_text())
        assert set(modules) == {"AutoTokenizer", *AUTO_CLASS_NAMES}
        assert all(module.startswith("transformers_modules.") for module in modules.values()), modules
        remote = np.load(out_dir / f"{folder.name}.npz")
        local, local_modules = folder_outputs(folder, cells_dir, trust_remote_code=False)
        assert all(module.split(".")[0] in PACKAGES for module in local_modules.values()), local_modules
        assert sorted(remote.files) == sorted(local)
        for key, value in local.items():
            np.testing.assert_allclose(remote[key], value, atol=1e-5, rtol=0, err_msg=f"{folder.name}: {key}")

    # The remote classifiers applied the logit adjustment their config.json records: tau * log(prior) on top of the
    # unadjusted logits.
    for folder in folders:
        assert json.loads((folder / "config.json").read_text())["logit_adjustment_tau"] == TAU
        remote = np.load(out_dir / f"{folder.name}.npz")["baron.AutoModelForSequenceClassification"]
        tokenizer = AutoTokenizer.from_pretrained(folder)
        unadjusted = AutoModelForSequenceClassification.from_pretrained(folder, logit_adjustment_tau=0.0).eval()
        with torch.no_grad():
            plain = unadjusted(**tokenizer(ad.read_h5ad(cells_dir / "baron.h5ad"), return_tensors="pt")).logits.numpy()
        np.testing.assert_allclose(remote - plain, np.broadcast_to(TAU * np.log(CLASS_PRIOR), plain.shape), atol=1e-5)

    # The Ensembl case went through both tables: nearly every gene the symbols found, it found by Ensembl id.
    from tokenization import GeneExpressionTokenizer

    tokenizer = GeneExpressionTokenizer.from_pretrained(folders[0])
    by_symbol = tokenizer.match_genes(pbmc3k_cells.var_names)[1]
    by_ensembl = tokenizer.match_genes(pbmc3k_cells.var["gene_ids"])[1]
    assert by_ensembl.matched_by_ensembl == by_ensembl.num_matched > 0.95 * by_symbol.num_matched


@pytest.mark.parametrize("head", ["ScBert2Model", "ScBert2ForMaskedRegression", "ScBert2ForSequenceClassification"])
def test_every_saved_model_folder_maps_every_auto_class(head, tmp_path):
    import modeling_scbert

    config = modeling_scbert.ScBert2Config.from_preset("scbert2-tiny", vocab_size=40, num_labels=2)
    getattr(modeling_scbert, head)(config).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_scbert2.ScBert2Config",
        "AutoModel": "modeling_scbert2.ScBert2Model",
        "AutoModelForMaskedLM": "modeling_scbert2.ScBert2ForMaskedRegression",
        "AutoModelForSequenceClassification": "modeling_scbert2.ScBert2ForSequenceClassification",
    }
    assert {"configuration_scbert2.py", "modeling_scbert2.py"} <= {p.name for p in tmp_path.iterdir()}


def test_scbert_v1_folder_maps_every_auto_class(tmp_path):
    import modeling_scbert

    config = modeling_scbert.ScBertConfig(num_tokens=7, dim=16, depth=1, heads=2, dim_head=8, nb_features=8,
                                          max_seq_len=11, classifier_type="pooled")
    modeling_scbert.ScBertForMaskedLM(config).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_scbert.ScBertConfig",
        "AutoModel": "modeling_scbert.ScBertModel",
        "AutoModelForMaskedLM": "modeling_scbert.ScBertForMaskedLM",
        "AutoModelForSequenceClassification": "modeling_scbert.ScBertForSequenceClassification",
    }


def test_tokenizer_folder_carries_the_gene_tables_and_uses_them(
    baron_vocabulary, pbmc3k_cells, tmp_path, monkeypatch, caplog
):
    from tokenization import GeneExpressionTokenizer
    from tokenization import tokenization_scbert

    ensembl_ids = list(pbmc3k_cells.var["gene_ids"])
    tokenizer = GeneExpressionTokenizer(genes=baron_vocabulary)
    expected = tokenizer.match_genes(ensembl_ids)[0]
    folder = tmp_path / "new" / "nested"  # a fresh folder, parents included
    tokenizer.save_pretrained(folder)
    saved = sorted(p.name for p in (folder / "gene_tables").iterdir())
    assert saved == sorted(tokenization_scbert.GENE_TABLE_FILES)
    tokenizer.save_pretrained(folder)  # saving over a folder again is fine

    # Without the package's copy (as under remote code), the folder's tables still match Ensembl ids and orthologs.
    monkeypatch.setattr(tokenization_scbert, "GENE_TABLE_DIR", tmp_path / "no_package_copy")
    loaded = GeneExpressionTokenizer.from_pretrained(folder)
    np.testing.assert_array_equal(loaded.match_genes(ensembl_ids)[0], expected)
    loaded.save_pretrained(folder)  # re-saved into the folder it was loaded from: the tables are its own
    assert sorted(p.name for p in (folder / "gene_tables").iterdir()) == saved
    bare = GeneExpressionTokenizer(genes=baron_vocabulary)  # neither a package copy nor a folder to take them from
    missing = r"Gene table gencode_v44_ensembl_to_symbol.csv.gz is missing.*by symbol does not"
    with pytest.raises(FileNotFoundError, match=missing):
        bare.match_genes(ensembl_ids)
    bare.save_pretrained(tmp_path / "bare")  # still saves, and says what the folder lacks
    assert not any((tmp_path / "bare" / "gene_tables").iterdir())
    assert "matches genes by symbol only" in caplog.text
    monkeypatch.undo()

    # A folder saved before the tables travelled with it falls back to the package's copy.
    for table in (folder / "gene_tables").iterdir():
        table.unlink()
    old = GeneExpressionTokenizer.from_pretrained(folder)
    np.testing.assert_array_equal(old.match_genes(ensembl_ids)[0], expected)


def test_register_for_auto_class_accepts_only_autotokenizer():
    from tokenization import GeneExpressionTokenizer

    GeneExpressionTokenizer.register_for_auto_class(AutoTokenizer)
    assert GeneExpressionTokenizer._auto_class == "AutoTokenizer"
    with pytest.raises(ValueError, match="only be registered with AutoTokenizer, got 'AutoModel'"):
        GeneExpressionTokenizer.register_for_auto_class("AutoModel")

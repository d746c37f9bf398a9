"""GeneExpressionTokenizer on real AnnData: matching, normalisation, both modes, Arrow, save/load, bad input."""

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from transformers import AutoTokenizer

from tokenization import GeneExpressionTokenizer
from tokenization.tokenization_scbert import ENSEMBL_PATTERN, _read_gene_table


def baron_tokenizer(adata, **kwargs):
    return GeneExpressionTokenizer.from_adata(adata, **kwargs)


def test_raw_counts_are_normalised_like_scbert(baron_small):
    tok = baron_tokenizer(baron_small, mode="scbert2", max_length=None, add_cls_token=False)
    batch = tok(baron_small[:3])
    counts = baron_small.X[:3].toarray()
    expected = np.log2(1 + counts / counts.sum(1, keepdims=True) * 1e4)
    for row in range(3):
        real = batch["attention_mask"][row] == 1
        genes = batch["input_ids"][row][real] - tok.num_special_tokens
        np.testing.assert_allclose(batch["values"][row][real], expected[row, genes], rtol=1e-5)
        assert set(genes) == set(np.flatnonzero(counts[row]))
    assert "raw counts detected" in tok.last_report.normalization


def test_scbert_v1_mode_bins_every_vocabulary_gene_and_appends_the_extra_token(baron_small):
    tok = baron_tokenizer(baron_small, mode="scbert")
    batch = tok(baron_small[:2], return_tensors="pt")
    assert batch["input_ids"].shape == (2, baron_small.n_vars + 1)
    counts = baron_small.X[:2].toarray()
    log2_values = np.log2(1 + counts / counts.sum(1, keepdims=True) * 1e4)
    expected = np.minimum(np.floor(log2_values), 5)
    np.testing.assert_array_equal(batch["input_ids"][:, :-1].numpy(), expected)
    assert torch.all(batch["input_ids"][:, -1] == 0)
    assert batch["input_ids"].max() <= 5


def test_log_normalised_input_is_detected_and_converted_to_log2(pbmc):
    genes = list(pbmc.raw.var_names)
    tok = GeneExpressionTokenizer(genes=genes, mode="scbert2", max_length=None, add_cls_token=False)
    batch = tok(pbmc.raw.to_adata()[:4])
    assert "log-normalised" in tok.last_report.normalization
    natural_log = pbmc.raw.X[:4].toarray()
    real = batch["attention_mask"][0] == 1
    genes0 = batch["input_ids"][0][real] - tok.num_special_tokens
    np.testing.assert_allclose(batch["values"][0][real], natural_log[0, genes0] / math.log(2), rtol=1e-5)


def test_v2_truncates_to_the_most_expressed_genes_and_pads_to_the_longest(baron_small):
    tok = baron_tokenizer(baron_small, mode="scbert2", max_length=65)
    batch = tok(baron_small[:4], return_tensors="pt")
    assert batch["input_ids"].shape == (4, 65)
    assert torch.all(batch["input_ids"][:, 0] == tok.cls_token_id)
    full = baron_tokenizer(baron_small, mode="scbert2", max_length=None)(baron_small[:1])
    values = full["values"][0][full["attention_mask"][0] == 1][1:]
    threshold = np.sort(values)[-64]
    kept = batch["values"][0][1:].numpy()
    assert kept.min() >= threshold - 1e-6
    np.testing.assert_array_equal(batch["bin_ids"].numpy(), np.minimum(np.floor(batch["values"].numpy()), 5))

    unpadded = baron_tokenizer(baron_small, mode="scbert2", max_length=None)
    lengths = np.diff(baron_small.X[:4].indptr) + 1
    padded = unpadded(baron_small[:4])
    assert padded["input_ids"].shape[1] == lengths.max()
    np.testing.assert_array_equal(padded["attention_mask"].sum(1), lengths)


def test_zero_sampling_adds_unexpressed_genes_with_value_zero(baron_small):
    tok = baron_tokenizer(baron_small, mode="scbert2", max_length=None, zero_fraction=0.5, add_cls_token=False)
    batch = tok(baron_small[:1])
    n_expressed = baron_small.X[0].nnz
    real = batch["attention_mask"][0] == 1
    assert real.sum() == n_expressed + round(0.5 * n_expressed)
    assert (batch["values"][0][real] == 0).sum() == round(0.5 * n_expressed)
    assert len(set(batch["input_ids"][0][real])) == real.sum()


def test_selected_genes_restrict_tokens_round_trip_and_keep_cells_without_any(baron_small, tmp_path):
    tok = baron_tokenizer(baron_small, mode="scbert2", max_length=None, add_cls_token=False)
    full = tok(baron_small[:3])
    chosen = [tok.genes[i - tok.num_special_tokens] for i in full["input_ids"][0][:40:2]]
    tok.selected_genes = chosen
    allowed = set(tok.convert_tokens_to_ids(chosen))
    batch = tok(baron_small[:3])
    real = batch["attention_mask"] == 1
    assert set(batch["input_ids"][real].tolist()) <= allowed
    assert real[0].sum() == len(chosen)  # the first cell expresses every chosen gene
    for row in range(3):  # values travel with their genes
        expected = dict(zip(full["input_ids"][row].tolist(), full["values"][row].tolist()))
        for gene, value in zip(batch["input_ids"][row][real[row]].tolist(), batch["values"][row][real[row]].tolist()):
            assert expected[gene] == value

    silent_gene = np.flatnonzero(np.asarray(baron_small.X[0].todense()).ravel() == 0)[0]
    tok.selected_genes = [tok.genes[tok.match_genes(baron_small.var_names)[0][silent_gene]]]
    alone = tok(baron_small[:1])
    assert alone["attention_mask"].sum() == baron_small.X[0].nnz  # nothing to select: the cell keeps its genes

    tok.selected_genes = chosen
    tok.save_pretrained(tmp_path)
    loaded = GeneExpressionTokenizer.from_pretrained(tmp_path)
    assert loaded.selected_genes == tok.selected_genes
    np.testing.assert_array_equal(loaded(baron_small[:3])["input_ids"], batch["input_ids"])


def test_bad_selected_genes_are_refused(baron_small):
    tok = baron_tokenizer(baron_small, mode="scbert2")
    with pytest.raises(ValueError, match="not in the vocabulary: \\['NOT_A_GENE'\\]"):
        tok.selected_genes = [tok.genes[0], "NOT_A_GENE"]
    with pytest.raises(ValueError, match="non-empty"):
        tok.selected_genes = []
    with pytest.raises(ValueError, match="full gene panel"):
        baron_tokenizer(baron_small, mode="scbert", selected_genes=tok.genes[:5])


def test_matching_by_ensembl_id_with_version_and_by_mouse_ortholog():
    ensembl = _read_gene_table("gencode_v44_ensembl_to_symbol.csv.gz")
    symbol_to_ensembl = {s: e for e, s in ensembl}
    vocab = ["GCG", "INS", "CD3E", "ACTB", "PTPRC", "MS4A1"]
    tok = GeneExpressionTokenizer(genes=vocab, mode="scbert2", min_overlap=0.0)
    names = [symbol_to_ensembl["GCG"] + ".7", symbol_to_ensembl["CD3E"], "Actb", "Ptprc", "ms4a1", "NOT_A_GENE"]
    assert ENSEMBL_PATTERN.match(names[0])
    index, report = tok.match_genes(names)
    assert index.tolist() == [0, 2, 3, 4, 5, -1]
    assert (report.matched_by_ensembl, report.matched_by_symbol, report.unmatched) == (2, 3, 1)

    human_to_mouse = {h: m for h, m in _read_gene_table("orthologs_1v1_human_mouse.csv.gz")}
    differing = next(h for h, m in human_to_mouse.items() if h.upper() != m.upper())
    tok = GeneExpressionTokenizer(genes=[differing], min_overlap=0.0)
    index, report = tok.match_genes([human_to_mouse[differing]])
    assert index.tolist() == [0] and report.matched_by_ortholog == 1


def test_duplicate_matches_keep_the_symbol_match_and_are_reported():
    ensembl = dict((s, e) for e, s in _read_gene_table("gencode_v44_ensembl_to_symbol.csv.gz"))
    tok = GeneExpressionTokenizer(genes=["ACTB"], min_overlap=0.0)
    index, report = tok.match_genes([ensembl["ACTB"], "ACTB"])
    assert index.tolist() == [-1, 0]
    assert report.duplicates_dropped == [ensembl["ACTB"]]


def test_low_overlap_is_refused_with_the_numbers(baron_small, pbmc):
    tok = baron_tokenizer(baron_small)
    with pytest.raises(ValueError, match=r"(?s)634 of 14,877 vocabulary genes found \(4.3%\) among 765 input genes.*At least 50%"):
        tok(pbmc.raw.to_adata())


def test_matrix_with_gene_names_equals_anndata_path(baron_small):
    tok = baron_tokenizer(baron_small, mode="scbert2")
    from_adata = tok(baron_small[:3])
    from_matrix = tok(baron_small.X[:3], gene_names=list(baron_small.var_names))
    for key in from_adata:
        np.testing.assert_array_equal(from_adata[key], from_matrix[key])
    dense = tok(baron_small.X[:3].toarray(), gene_names=list(baron_small.var_names))
    np.testing.assert_array_equal(dense["values"], from_adata["values"])


def test_to_dataset_builds_arrow_rows_equal_to_direct_tokenization(baron_small, tmp_path):
    tok = baron_tokenizer(baron_small, mode="scbert2", max_length=128)
    ds = tok.to_dataset(baron_small, label_key="cell_type1", save_path=tmp_path / "arrow")
    assert len(ds) == baron_small.n_obs
    assert ds.cache_files, "the saved dataset should be memory-mapped from disk"
    names = ds.features["label"].names
    assert [names[i] for i in ds["label"][:5]] == baron_small.obs["cell_type1"].astype(str).tolist()[:5]
    from_ds = tok.collate([ds[i] for i in range(3)], return_tensors="np")
    direct = tok(baron_small[:3])
    for key in direct:
        np.testing.assert_array_equal(from_ds[key], direct[key])
    assert from_ds["labels"].tolist() == list(ds["label"][:3])


def test_save_load_round_trip_is_exact_and_autotokenizer_loads_it(baron_small, tmp_path):
    tok = baron_tokenizer(baron_small, mode="scbert2", max_length=300, zero_fraction=0.1, num_bins=7)
    tok.save_pretrained(tmp_path)
    loaded = GeneExpressionTokenizer.from_pretrained(tmp_path)
    assert loaded.genes == tok.genes and loaded._init_kwargs() == tok._init_kwargs()
    assert loaded.get_vocab() == tok.get_vocab()
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert type(auto) is GeneExpressionTokenizer and auto.genes == tok.genes
    remote = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(remote).__name__ == "GeneExpressionTokenizer" and remote.genes == tok.genes
    a, b = tok.__class__.from_pretrained(tmp_path, zero_fraction=0.0), loaded
    b.zero_fraction = 0.0
    np.testing.assert_array_equal(a(baron_small[:2])["input_ids"], b(baron_small[:2])["input_ids"])


def test_loading_a_folder_without_a_vocabulary_fails_clearly(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(OSError, match="vocab.json"):
        GeneExpressionTokenizer.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def small_tok():
    return GeneExpressionTokenizer(genes=["A1", "B2", "C3"], mode="scbert2")


def test_nan_and_inf_are_refused(small_tok):
    for bad in (np.nan, np.inf):
        X = np.array([[1.0, bad, 2.0]])
        with pytest.raises(ValueError, match="NaN or infinite values in 1 cells"):
            small_tok(X, gene_names=["A1", "B2", "C3"])


def test_negative_values_are_refused_as_scaled_data(pbmc):
    tok = GeneExpressionTokenizer(genes=list(pbmc.var_names))
    with pytest.raises(ValueError, match="negative values .* z-scored"):
        tok(pbmc)


def test_empty_cells_are_refused(small_tok):
    X = sp.csr_matrix(np.array([[1.0, 0, 2.0], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"1 cells have no expressed genes \(first rows: \[1\]\)"):
        small_tok(X, gene_names=["A1", "B2", "C3"])


def test_duplicate_gene_names_are_refused(small_tok):
    adata = ad.AnnData(np.ones((2, 3), dtype=np.float32), var=pd.DataFrame(index=["A1", "A1", "C3"]))
    with pytest.raises(ValueError, match="occur more than once"):
        small_tok(adata)
    with pytest.raises(ValueError, match="duplicate gene symbols"):
        GeneExpressionTokenizer(genes=["A1", "a1"])


def test_missing_gene_names_are_refused(small_tok):
    adata = ad.AnnData(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="genes have no names"):
        small_tok(adata)
    with pytest.raises(ValueError, match="pass gene_names"):
        small_tok(np.ones((2, 3)))
    with pytest.raises(ValueError, match="shape .* 2 gene names"):
        small_tok(np.ones((2, 3)), gene_names=["A1", "B2"])


def test_unknown_gene_id_style_is_named_in_the_error(small_tok):
    X = np.ones((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"look like mouse Ensembl ids"):
        small_tok(X, gene_names=["ENSMUSG00000000001", "ENSMUSG00000000003", "ENSMUSG00000000028"])
    with pytest.raises(ValueError, match=r"look like numbers"):
        small_tok(X, gene_names=["101", "102", "xyz"][:2] + ["103"])


def test_non_anndata_input_is_refused(small_tok):
    with pytest.raises(TypeError, match="Expected an anndata.AnnData"):
        small_tok({"A1": [1, 2]})
    with pytest.raises(TypeError, match="Expected an anndata.AnnData"):
        small_tok([[1, 2, 3]])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        GeneExpressionTokenizer(genes=["A"], mode="bert")
    with pytest.raises(ValueError, match="clash with the special tokens"):
        GeneExpressionTokenizer(genes=["<pad>"])
    with pytest.raises(ValueError, match="at least one gene"):
        GeneExpressionTokenizer(genes=[])


def test_missing_label_column_is_named(baron_small):
    tok = baron_tokenizer(baron_small)
    with pytest.raises(KeyError, match="label_key='celltype' is not a column"):
        tok.to_dataset(baron_small, label_key="celltype")

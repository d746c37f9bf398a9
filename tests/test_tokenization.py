"""GeneExpressionTokenizer on real AnnData: matching, normalisation, both modes, Arrow, save/load, bad input."""

import json
import logging
import math
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from transformers import AutoTokenizer

from tokenization import GeneExpressionTokenizer
from tokenization.tokenization_scbert import ENSEMBL_PATTERN, GENE_TABLE_DIR, _read_gene_table

PBMC3K_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain" / "pbmc3k_10x.h5ad"


def baron_tokenizer(adata, **kwargs):
    return GeneExpressionTokenizer.from_adata(adata, **kwargs)


def gene_table(name):
    return _read_gene_table(GENE_TABLE_DIR / name)


@pytest.fixture(scope="module")
def pbmc3k_genes():
    """10x PBMC 3k's genes: human symbols (var_names) and their Ensembl ids (var.gene_ids)."""
    if not PBMC3K_PATH.exists():
        pytest.skip(f"real data not found at {PBMC3K_PATH}")
    var = ad.read_h5ad(PBMC3K_PATH, backed="r").var
    return list(var.index), list(var["gene_ids"])


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


def test_encoding_leaves_the_callers_matrix_untouched(pbmc):
    """Log-normalised float32 CSR is converted in place inside the tokenizer: on the caller's own matrix that scaled
    adata.X by 1/ln 2 at every call (so a second encoding of the same AnnData differed from the first)."""
    import scipy.sparse as sp

    adata = pbmc.raw.to_adata()[:50].copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    before = adata.X.copy()
    tok = GeneExpressionTokenizer(genes=list(adata.var_names), mode="scbert2", max_length=None)
    first, second = tok.encode_matrix(adata), tok.encode_matrix(adata)
    assert (adata.X != before).nnz == 0
    np.testing.assert_array_equal(first.toarray(), second.toarray())


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


def test_pad_to_multiple_of_rounds_the_length_up_with_padding_only(baron_small):
    tok = baron_tokenizer(baron_small, mode="scbert2", max_length=None)
    cells = list(tok._iter_cells(tok.encode_matrix(baron_small[:5])))
    plain = tok.collate(cells, return_tensors="np")
    padded = tok.collate(cells, return_tensors="np", pad_to_multiple_of=32)
    length = plain["input_ids"].shape[1]
    assert padded["input_ids"].shape[1] == -(-length // 32) * 32 > length
    for key in ("input_ids", "values", "bin_ids", "attention_mask"):
        np.testing.assert_array_equal(padded[key][:, :length], plain[key])
    assert (padded["attention_mask"][:, length:] == 0).all()
    assert (padded["input_ids"][:, length:] == tok.pad_token_id).all()
    for bad in ({"pad_to_multiple_of": 0}, {"pad_to_multiple_of": 8, "packed": True}):
        with pytest.raises(ValueError, match="pad_to_multiple_of=.* needs a positive int and padded cells"):
            tok.collate(cells, **bad)


def test_truncation_keeps_the_same_genes_whatever_order_a_cells_genes_come_in(baron_small):
    # Raw counts tie often at the cut (many genes of count 1): the kept genes must not depend on the input order,
    # or an annotated cell (genes in CSR order) gets other tokens than in fine-tuning (genes sorted in Arrow).
    tok = baron_tokenizer(baron_small, mode="scbert2", max_length=65)
    X = tok.encode_matrix(baron_small[:8])
    cells = list(tok._iter_cells(X))
    values = np.asarray(cells[0]["values"])
    assert len(values) > 64 and np.sum(values == np.sort(values)[-64]) > 1  # a tie at the cut
    reversed_cells = [{key: np.asarray(value)[::-1] for key, value in cell.items()} for cell in cells]
    rng = np.random.default_rng(0)
    shuffled = []
    for cell in cells:
        order = rng.permutation(len(cell["gene_ids"]))
        shuffled.append({key: np.asarray(value)[order] for key, value in cell.items()})
    reference = tok.collate(cells)
    for other in (reversed_cells, shuffled):
        batch = tok.collate(other)
        for key in ("input_ids", "values", "attention_mask"):
            np.testing.assert_array_equal(np.asarray(batch[key]), np.asarray(reference[key]), err_msg=key)


def test_old_tokenizer_config_with_zero_sampling_loads_deterministic_with_a_warning(baron_small, tmp_path, caplog):
    tok = baron_tokenizer(baron_small, mode="scbert2", max_length=None, add_cls_token=False)
    tok.save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    assert "zero_fraction" not in config and "seed" not in config
    config.update(zero_fraction=0.1, seed=3)  # as saved by versions that sampled unexpressed genes themselves
    config_path.write_text(json.dumps(config))

    with caplog.at_level(logging.WARNING, logger="tokenization.tokenization_scbert"):
        loaded = GeneExpressionTokenizer.from_pretrained(tmp_path)
    assert "zero_fraction=0.1" in caplog.text and "training collator" in caplog.text
    assert not hasattr(loaded, "zero_fraction") and not hasattr(loaded, "_rng")
    first, second = loaded(baron_small[:8]), loaded(baron_small[:8])
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    np.testing.assert_array_equal(first["input_ids"], tok(baron_small[:8])["input_ids"])
    assert (first["values"][first["attention_mask"] == 1] > 0).all()  # only expressed genes, no sampled zeros

    caplog.clear()
    config.update(zero_fraction=0.0)
    config_path.write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="tokenization.tokenization_scbert"):
        GeneExpressionTokenizer.from_pretrained(tmp_path)
    assert "zero_fraction" not in caplog.text


def test_selected_token_ids_are_the_sorted_read_only_ids_of_selected_genes(baron_small):
    tok = baron_tokenizer(baron_small, mode="scbert2")
    assert tok.selected_token_ids is None
    chosen = [tok.genes[9], tok.genes[2], tok.genes[5]]
    tok.selected_genes = chosen
    ids = tok.selected_token_ids
    assert ids.dtype == np.int64 and ids.tolist() == sorted(tok.convert_tokens_to_ids(chosen))
    assert tok.selected_genes == [tok.genes[2], tok.genes[5], tok.genes[9]]
    with pytest.raises(ValueError, match="read-only"):
        ids[0] = 0
    with pytest.raises(AttributeError):
        tok.selected_token_ids = ids


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


@pytest.mark.parametrize("max_length", [None, 24])
@pytest.mark.parametrize("add_cls_token", [True, False])
def test_token_lengths_are_the_collated_lengths(baron_small, max_length, add_cls_token):
    tok = baron_tokenizer(baron_small, mode="scbert2", max_length=max_length, add_cls_token=add_cls_token)
    cells = baron_small[:40]
    expressed = np.diff(sp.csr_matrix(cells.X).indptr)
    counts = sp.csr_matrix(cells.X).toarray()
    only_in_first = np.flatnonzero((counts[0] > 0) & (counts[1] == 0))[:30]  # the second cell has none of them
    tok.selected_genes = list(baron_small.var_names[only_in_first])
    X = tok.encode_matrix(cells)
    lengths = tok.token_lengths(X)
    assert lengths[1] == min(expressed[1] + add_cls_token, max_length or np.inf)  # nothing selected: all it has
    np.testing.assert_array_equal(lengths, tok.collate(list(tok._iter_cells(X)))["attention_mask"].sum(1))
    assert (lengths < expressed).any()  # the selection (and the cap) shorten cells: expressed counts overstate them
    v1 = baron_tokenizer(baron_small, mode="scbert")
    assert set(v1.token_lengths(v1.encode_matrix(cells))) == {v1.sequence_length}


def test_bad_selected_genes_are_refused(baron_small):
    tok = baron_tokenizer(baron_small, mode="scbert2")
    with pytest.raises(ValueError, match="not in the vocabulary: \\['NOT_A_GENE'\\]"):
        tok.selected_genes = [tok.genes[0], "NOT_A_GENE"]
    with pytest.raises(ValueError, match="non-empty"):
        tok.selected_genes = []
    with pytest.raises(ValueError, match="full gene panel"):
        baron_tokenizer(baron_small, mode="scbert", selected_genes=tok.genes[:5])


def test_matching_by_ensembl_id_with_version_and_by_mouse_ortholog():
    ensembl = gene_table("gencode_v44_ensembl_to_symbol.csv.gz")
    symbol_to_ensembl = {s: e for e, s in ensembl}
    vocab = ["GCG", "INS", "CD3E", "ACTB", "PTPRC", "MS4A1"]
    tok = GeneExpressionTokenizer(genes=vocab, mode="scbert2", min_overlap=0.0)
    names = [symbol_to_ensembl["GCG"] + ".7", symbol_to_ensembl["CD3E"], "Actb", "Ptprc", "ms4a1", "NOT_A_GENE"]
    assert ENSEMBL_PATTERN.match(names[0])
    index, report = tok.match_genes(names)
    assert index.tolist() == [0, 2, 3, 4, 5, -1]
    assert (report.matched_by_ensembl, report.matched_by_symbol, report.unmatched) == (2, 3, 1)

    human_to_mouse = {h: m for h, m in gene_table("orthologs_1v1_human_mouse.csv.gz")}
    differing = next(h for h, m in human_to_mouse.items() if h.upper() != m.upper())
    tok = GeneExpressionTokenizer(genes=[differing], min_overlap=0.0)
    index, report = tok.match_genes([human_to_mouse[differing]])
    assert index.tolist() == [0] and report.matched_by_ortholog == 1


def test_duplicate_matches_keep_the_symbol_match_and_are_reported():
    ensembl = dict((s, e) for e, s in gene_table("gencode_v44_ensembl_to_symbol.csv.gz"))
    tok = GeneExpressionTokenizer(genes=["ACTB"], min_overlap=0.0)
    index, report = tok.match_genes([ensembl["ACTB"], "ACTB"])
    assert index.tolist() == [-1, 0]
    assert report.duplicates_dropped == [ensembl["ACTB"]]


def test_add_genes_appends_only_what_the_vocabulary_does_not_match_and_round_trips(tmp_path):
    human_to_mouse = {h: m for h, m in gene_table("orthologs_1v1_human_mouse.csv.gz")}
    differing = next(h for h, m in human_to_mouse.items() if h.upper() != m.upper())
    tok = GeneExpressionTokenizer(genes=["ACTB", differing], mode="scbert2", min_overlap=0.0)
    # by symbol (any case), by ortholog, new, new again, a case variant of the new one
    names = ["actb", human_to_mouse[differing], "Gm12345", "Gm12345", "GM12345", "NEW_GENE"]
    assert tok.add_genes(names) == 2
    assert tok.genes == ["ACTB", differing, "Gm12345", "NEW_GENE"] and len(tok) == 3 + 4
    assert tok.add_genes(names) == 0
    index, report = tok.match_genes(names)
    assert index.tolist() == [0, 1, 2, -1, -1, 3] and report.duplicates_dropped == ["Gm12345", "GM12345"]
    tok.save_pretrained(tmp_path)
    assert GeneExpressionTokenizer.from_pretrained(tmp_path).get_vocab() == tok.get_vocab()


def test_add_genes_is_refused_for_scbert_v1_and_for_special_token_names():
    with pytest.raises(ValueError, match="fixed gene panel"):
        GeneExpressionTokenizer(genes=["ACTB"], mode="scbert").add_genes(["GCG"])
    tok = GeneExpressionTokenizer(genes=["ACTB"], mode="scbert2")
    with pytest.raises(ValueError, match="clash with the special tokens"):
        tok.add_genes(["GCG", tok.pad_token])
    assert tok.genes == ["ACTB"]


def test_human_ensembl_ids_reach_a_mouse_vocabulary_through_orthologs(baron, pbmc3k_genes):
    symbols, ensembl_ids = pbmc3k_genes
    tok = GeneExpressionTokenizer(genes=list(baron.var_names), min_overlap=0.0)
    by_symbol = tok.match_genes(symbols)[1]
    index, by_ensembl = tok.match_genes(ensembl_ids)
    # Measured: 86.0% by symbol, 84.0% by Ensembl id (80.4% before Ensembl ids went on to the ortholog); the rest
    # is nomenclature drift between the 2015 symbols of both data sets and GENCODE v44.
    assert by_symbol.vocab_coverage > 0.85 and by_ensembl.vocab_coverage > 0.83
    assert by_ensembl.matched_by_ensembl == by_ensembl.num_matched  # reported as matched by Ensembl id
    assert by_ensembl.matched_by_symbol == by_ensembl.matched_by_ortholog == 0

    human_to_mouse = dict(gene_table("orthologs_1v1_human_mouse.csv.gz"))
    ensembl_of = {s: e for e, s in gene_table("gencode_v44_ensembl_to_symbol.csv.gz")}
    differing = next(h for h, m in human_to_mouse.items() if h.upper() != m.upper() and h in ensembl_of)
    small = GeneExpressionTokenizer(genes=[human_to_mouse[differing], "Actb"], min_overlap=0.0)
    index, report = small.match_genes([ensembl_of[differing] + ".3", ensembl_of["ACTB"]])
    assert index.tolist() == [0, 1] and report.matched_by_ensembl == 2


def test_low_overlap_is_refused_with_the_numbers_and_how_to_lower_the_threshold(baron_small, pbmc):
    tok = baron_tokenizer(baron_small)
    numbers = r"(?s)634 of 14,877 vocabulary genes found \(4.3%\) among 765 input genes.*At least 50%"
    with pytest.raises(ValueError, match=numbers) as error:
        tok(pbmc.raw.to_adata())
    message = str(error.value)
    assert "Pass gene symbols or human Ensembl ids" in message
    assert "min_overlap=0.04 in Python" in message and "from_pretrained(folder, min_overlap=0.04)" in message
    assert "--min_overlap 0.04 with the training and annotation commands" in message
    tok.min_overlap = 0.04  # the advised threshold lets the same input through
    assert tok.match_genes(pbmc.raw.var_names)[1].num_matched == 634


def test_mouse_ensembl_ids_are_refused_with_advice_to_pass_symbols(baron_small):
    tok = baron_tokenizer(baron_small)
    mouse_ids = [f"ENSMUSG{i:011d}" for i in range(1, 301)]
    with pytest.raises(ValueError, match="Mouse Ensembl ids cannot be mapped with the shipped tables") as error:
        tok(np.ones((2, len(mouse_ids)), dtype=np.float32), gene_names=mouse_ids)
    assert "GENCODE v44 is human-only" in str(error.value)
    assert "gene_key='a var column with symbols'" in str(error.value)
    assert "or human Ensembl ids" not in str(error.value)


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
    tok = baron_tokenizer(baron_small, mode="scbert2", max_length=300, num_bins=7)
    tok.save_pretrained(tmp_path)
    loaded = GeneExpressionTokenizer.from_pretrained(tmp_path)
    assert loaded.genes == tok.genes and loaded._init_kwargs() == tok._init_kwargs()
    assert loaded.get_vocab() == tok.get_vocab()
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert type(auto) is GeneExpressionTokenizer and auto.genes == tok.genes
    remote = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(remote).__name__ == "GeneExpressionTokenizer" and remote.genes == tok.genes
    np.testing.assert_array_equal(tok(baron_small[:2])["input_ids"], loaded(baron_small[:2])["input_ids"])


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
    with pytest.raises(ValueError, match="max_length must be >= 2 or None, got 1"):
        GeneExpressionTokenizer(genes=["A"], max_length=1)
    tokenizer = GeneExpressionTokenizer(genes=["A"], max_length=8)
    with pytest.raises(ValueError, match="max_length must be >= 2 or None, got 1"):
        tokenizer.max_length = 1  # as `finetune --max_length` sets a loaded folder's
    assert tokenizer.max_length == 8


def test_missing_label_column_is_named(baron_small):
    tok = baron_tokenizer(baron_small)
    with pytest.raises(KeyError, match="label_key='celltype' is not a column"):
        tok.to_dataset(baron_small, label_key="celltype")

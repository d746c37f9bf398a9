"""The pretraining corpus: raw-count `.h5ad` files of different tissues, technologies, gene panels and species,
quality-controlled with scanpy and tokenized under one vocabulary of human gene symbols.

    corpus = build_corpus(["../shared/data/pretrain", "papalexi.h5ad"], QCSettings(), max_length=512)

- QC per file (scanpy): cells with fewer than ``min_genes`` expressed genes (``min_genes_targeted`` for a targeted
  panel of fewer than ``targeted_panel_genes`` measured genes, e.g. a 299-gene Perturb-seq panel) or a mitochondrial
  share above ``max_mito_pct`` are dropped, as are genes expressed in fewer than ``min_cells`` cells; every drop is
  counted in the report.
- Vocabulary: human symbols; a mouse file's genes enter through their one-to-one human orthologs (the tokenizer's
  table); a gene expressed in fewer than ``min_cells_per_vocab_gene`` cells of the whole corpus is left out.
- Panels: each cell keeps the index of its file, and `Corpus.panels` lists the token ids each file measured. A gene
  a file did not measure is not an observed zero, so the pretraining collator draws a cell's "not expressed" genes
  from its own file's panel only (scBERT 2.0), or hides it behind the mask token (scBERT v1).
- scBERT v1 (``panel_genes``): v1 reads one fixed gene panel in fixed positions, and its cost grows with the panel, so
  the vocabulary is narrowed to the corpus's highly variable genes (`train.genes.highly_variable_genes`, over the
  pooled cells) and the tokenizer is a ``mode="scbert"`` one over them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tokenization import GeneExpressionTokenizer
from tokenization.tokenization_scbert import GENE_TABLE_DIR, ORTHOLOG_TABLE, _read_gene_table
from train.data import default_cache_dir, read_h5ad
from train.genes import highly_variable_genes

# The saved tokenizer's min_overlap: the vocabulary is the union of several panels (a Smart-seq2 file alone brings
# thousands of genes a 10x data set never detects), so a full 10x transcriptome covers about half of it and a
# targeted panel a few per cent (a v1 panel of the corpus's variable genes is alike: 10x PBMC 3k measures 46% of it).
# 2% still refuses inputs whose gene names do not match at all (wrong identifiers).
PRETRAINED_MIN_OVERLAP = 0.02


@dataclass
class QCSettings:
    min_genes: int = 200
    min_genes_targeted: int = 20
    targeted_panel_genes: int = 2000
    max_mito_pct: float = 20.0
    min_cells: int = 3
    min_cells_per_vocab_gene: int = 20
    min_panel_genes: int = 100
    values: str = "counts"  # or "normalized": log-normalised input, where counts-based QC metrics still apply


@dataclass
class Corpus:
    dataset: object  # datasets.Dataset with gene_ids, values, panel
    tokenizer: GeneExpressionTokenizer
    panels: list[np.ndarray]  # token ids each file measured, by the cells' "panel" column
    report: dict


def corpus_files(sources: list[str]) -> list[Path]:
    """The .h5ad files named by ``sources`` (files, or folders whose *.h5ad files are all taken), sorted per folder."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(path.glob("*.h5ad"))
            if not found:
                raise FileNotFoundError(f"Corpus folder {path} holds no .h5ad files.")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"Corpus file or folder {path} does not exist.")
    if len({f.resolve() for f in files}) != len(files):
        raise ValueError(f"A corpus file is named twice: {[str(f) for f in files]}.")
    if len(files) == 1:
        warnings.warn(f"The corpus is a single file ({files[0]}): the vocabulary and the model will know only its "
                      "tissue, technology and gene panel. Add files (or folders) to --corpus for a broader model.",
                      stacklevel=2)
    return files


def check_values(adata, path: Path, expected: str) -> None:
    """Refuses normalised values where raw counts are expected, and the reverse."""
    import scipy.sparse as sp

    data = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X).ravel()
    sample = data[: 1_000_000]
    integer = bool(np.all(np.mod(sample, 1) == 0))
    if expected == "counts" and not integer:
        raise ValueError(f"{path} holds non-integer values (e.g. {sample[np.mod(sample, 1) != 0][0]:.4g}): it looks "
                         "normalised, and corpus QC counts genes and UMIs from raw counts. Put the raw counts in .X "
                         "(adata.raw or a counts layer), or pass --corpus_values normalized if these values are meant.")
    if expected == "normalized" and integer:
        raise ValueError(f"{path} holds only integer values: it looks like raw counts, but --corpus_values normalized "
                         "was given. Drop that flag for raw counts.")


def species_of(names: list[str], orthologs: list[tuple[str, str]]) -> str:
    """'mouse' when more of the names are mouse than human symbols of the one-to-one ortholog table, else 'human'."""
    upper = {n.upper() for n in names}
    human = len(upper & {h.upper() for h, _ in orthologs})
    mouse = len(upper & {m.upper() for _, m in orthologs})
    return "mouse" if mouse > human else "human"


def quality_control(adata, path: Path, settings: QCSettings):
    """The cells and genes of ``adata`` passing QC, and the counts of what was dropped."""
    import scanpy as sc

    adata.var["mt"] = adata.var_names.str.upper().str.startswith("MT-")
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
    targeted = adata.n_vars < settings.targeted_panel_genes
    min_genes = settings.min_genes_targeted if targeted else settings.min_genes
    few_genes = adata.obs["n_genes_by_counts"].to_numpy() < min_genes
    mito = adata.obs["pct_counts_mt"].to_numpy() > settings.max_mito_pct
    keep = ~few_genes & ~mito
    if not keep.any():
        raise ValueError(f"Every one of the {adata.n_obs:,} cells of {path} fails QC: {few_genes.sum():,} express "
                         f"fewer than {min_genes} genes, {mito.sum():,} have more than {settings.max_mito_pct}% "
                         "mitochondrial counts. Check the file, or lower --min_genes / raise --max_mito_pct.")
    cells = adata[keep].copy()
    expressed_in = np.asarray((cells.X > 0).sum(axis=0)).ravel()
    cells = cells[:, expressed_in >= settings.min_cells].copy()
    report = {"file": str(path), "cells_in": int(adata.n_obs), "cells_kept": int(cells.n_obs),
              "dropped_few_genes": int(few_genes.sum()), "dropped_mito": int((mito & ~few_genes).sum()),
              "genes_in": int(adata.n_vars), "genes_kept": int(cells.n_vars), "targeted_panel": targeted,
              "min_genes": min_genes}
    return cells, report


def human_symbols(names: list[str], species: str, orthologs: list[tuple[str, str]]) -> list[str | None]:
    """Each gene's human symbol (upper case): itself for a human file, its one-to-one ortholog (or None) for mouse."""
    if species == "human":
        return [n.upper() for n in names]
    to_human = {m.upper(): h.upper() for h, m in orthologs}
    return [to_human.get(n.upper()) for n in names]


def corpus_fingerprint(files: list[Path], settings: QCSettings, max_length: int | None,
                       panel_genes: int | None = None) -> str:
    key = {"qc": asdict(settings), "max_length": max_length, **({"panel_genes": panel_genes} if panel_genes else {})}
    digest = hashlib.sha256(json.dumps(key).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def build_corpus(sources: list[str], settings: QCSettings, max_length: int | None = 512,
                 cache_dir: str | os.PathLike | None = None, log=print, panel_genes: int | None = None) -> Corpus:
    """QC, vocabulary and tokenization of the corpus files, cached under a fingerprint of the files and settings.
    ``panel_genes``: a scBERT v1 corpus over (about) that many highly variable genes of the vocabulary."""
    import datasets

    files = corpus_files(sources)
    fingerprint = corpus_fingerprint(files, settings, max_length, panel_genes)
    target = Path(cache_dir or default_cache_dir()) / f"corpus-{fingerprint}"
    if (target / "corpus.json").exists():
        saved = json.loads((target / "corpus.json").read_text())
        tokenizer = GeneExpressionTokenizer.from_pretrained(target / "tokenizer")
        panels = [np.asarray(p, dtype=np.int64) for p in saved["panels"]]
        return Corpus(datasets.load_from_disk(str(target / "dataset")), tokenizer, panels, saved["report"])

    orthologs = _read_gene_table(GENE_TABLE_DIR / ORTHOLOG_TABLE)
    filtered, reports = [], []
    for path in files:
        adata = read_h5ad(path)
        check_values(adata, path, settings.values)
        adata.var_names_make_unique()
        species = species_of(adata.var_names.tolist(), orthologs)
        cells, report = quality_control(adata, path, settings)
        report["species"] = species
        log(f"QC {path.name}: {report['cells_kept']:,} of {report['cells_in']:,} cells kept "
            f"({report['dropped_few_genes']:,} with < {report['min_genes']} genes, {report['dropped_mito']:,} with "
            f"> {settings.max_mito_pct}% mitochondrial counts); {report['genes_kept']:,} of {report['genes_in']:,} "
            f"genes in >= {settings.min_cells} cells; {species}")
        filtered.append(cells)
        reports.append(report)

    cells_per_gene: dict[str, int] = {}
    for cells, report in zip(filtered, reports):
        counts = np.asarray((cells.X > 0).sum(axis=0)).ravel()
        for symbol, count in zip(human_symbols(cells.var_names.tolist(), report["species"], orthologs), counts):
            if symbol is not None:
                cells_per_gene[symbol] = cells_per_gene.get(symbol, 0) + int(count)
    vocabulary = sorted(g for g, n in cells_per_gene.items() if n >= settings.min_cells_per_vocab_gene)
    log(f"Vocabulary: {len(vocabulary):,} human gene symbols expressed in >= {settings.min_cells_per_vocab_gene} "
        f"corpus cells (of {len(cells_per_gene):,} seen).")
    tokenizer = GeneExpressionTokenizer(vocabulary, mode="scbert2", max_length=max_length, min_overlap=0.0)
    if panel_genes:
        tokenizer = scbert_v1_panel(tokenizer, filtered, panel_genes, log)

    parts, panels = [], []
    for index, (cells, report) in enumerate(zip(filtered, reports)):
        vocab_index, match = tokenizer.match_genes(cells.var_names.tolist())
        report["vocabulary_genes_measured"] = match.num_matched
        if match.num_matched < settings.min_panel_genes:
            raise ValueError(f"{report['file']} shares only {match.num_matched} genes with the corpus vocabulary "
                             f"(at least {settings.min_panel_genes} needed, --min_panel_genes): {match}")
        panels.append(np.sort(vocab_index[vocab_index >= 0]) + tokenizer.num_special_tokens)
        part = tokenizer.to_dataset(cells)
        parts.append(part.add_column("panel", [index] * len(part)))
    dataset = datasets.concatenate_datasets(parts)
    tokenizer.min_overlap = PRETRAINED_MIN_OVERLAP
    report = {"files": reports, "cells": len(dataset), "vocabulary_size": tokenizer.num_genes, "qc": asdict(settings)}
    if panel_genes:
        report["panel"] = {"requested_genes": panel_genes, "genes": tokenizer.num_genes,
                           "from_vocabulary_of": len(vocabulary)}

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    dataset.save_to_disk(str(partial / "dataset"))
    tokenizer.save_pretrained(partial / "tokenizer")
    (partial / "corpus.json").write_text(json.dumps({"panels": [p.tolist() for p in panels], "report": report}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return Corpus(datasets.load_from_disk(str(target / "dataset")), tokenizer, panels, report)


def scbert_v1_panel(vocabulary: GeneExpressionTokenizer, filtered: list, panel_genes: int, log=print):
    """A scBERT v1 tokenizer over the highly variable genes of the QC'd files, pooled in the vocabulary's genes."""
    import scipy.sparse as sp

    if panel_genes < 2:
        raise ValueError(f"--panel_genes must be at least 2 (a scBERT v1 panel of genes), got {panel_genes}.")
    matrix = sp.vstack([vocabulary.encode_matrix(cells) for cells in filtered]).tocsr()
    genes = highly_variable_genes(matrix, vocabulary, panel_genes)
    log(f"scBERT v1 panel: {len(genes):,} highly variable genes (Seurat and Cell Ranger flavours, {panel_genes:,} "
        f"each) of the {vocabulary.num_genes:,}-gene vocabulary.")
    return GeneExpressionTokenizer(genes, mode="scbert", max_length=None, min_overlap=0.0)

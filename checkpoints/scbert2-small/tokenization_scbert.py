"""Gene-expression tokenizer shared by the whole scBERT family.

One path for every cell: an AnnData (or a matrix plus gene names) is matched to the vocabulary, normalised when it
holds raw counts, and turned into the sparse form "expressed vocabulary genes + their values". From that form
`collate` builds a model batch in one of two modes:

- ``"scbert"`` (v1): one token per vocabulary gene in fixed order plus scBERT's trailing extra token; the token is the
  expression bin ``min(floor(log2(1 + normalised)), num_bins)``; gene identity is the position.
- ``"scbert2"``: only the expressed genes (truncated to the most expressed ``max_length``), as gene ids, continuous
  values, bin ids and an attention mask, padded to the batch's longest cell (or, with ``packed=True``, concatenated
  into one unpadded row with per-cell boundaries for flash attention).

The tokenizer is deterministic: the same cells always give the same inputs. Augmentation (sampling unexpressed genes,
gene dropout) belongs to the training collators.

This file imports only numpy/scipy/anndata/transformers (datasets lazily) so that it can be copied into a model folder
and loaded as Hub remote code; `save_pretrained` copies the gene tables next to it for the same reason.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp
from transformers import BatchEncoding
from transformers.utils import PushToHubMixin, cached_file, logging

logger = logging.get_logger(__name__)

VOCAB_FILE = "vocab.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MODES = ("scbert", "scbert2")
SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>")
GENE_TABLE_SUBFOLDER = "gene_tables"
ENSEMBL_TABLE = "gencode_v44_ensembl_to_symbol.csv.gz"
ORTHOLOG_TABLE = "orthologs_1v1_human_mouse.csv.gz"
# Files that travel with a saved tokenizer: the tables and their provenance.
GENE_TABLE_FILES = (ENSEMBL_TABLE, ORTHOLOG_TABLE, "README.md")
# The package's copy. Under remote code this file runs from the HF modules cache, which has no tables: there the
# folder's own copy is used (see `from_pretrained`).
GENE_TABLE_DIR = Path(__file__).resolve().parent / GENE_TABLE_SUBFOLDER
# How an input gene found its vocabulary gene, in order of trust (duplicates keep the most trusted match).
BY_SYMBOL, BY_ENSEMBL, BY_ENSEMBL_ORTHOLOG, BY_ORTHOLOG = 1, 2, 3, 4
ENSEMBL_PATTERN = re.compile(r"^(ENS[A-Z]*G\d{11})(\.\d+)?$", re.IGNORECASE)
# Values above this cannot be log-normalised expression (log2(1 + 1e4) ~ 13.3), so they are taken as unlogged.
MAX_LOG_VALUE = 30.0


@dataclass
class GeneMatchReport:
    """How an input's genes were matched to the vocabulary and how its values were treated."""

    num_input_genes: int
    vocab_size: int
    matched_by_symbol: int = 0
    # Through the GENCODE symbol, directly or through its one-to-one ortholog (human ids on a mouse vocabulary).
    matched_by_ensembl: int = 0
    matched_by_ortholog: int = 0
    unmatched: int = 0
    duplicates_dropped: list[str] = field(default_factory=list)
    normalization: str = ""

    @property
    def num_matched(self) -> int:
        return self.matched_by_symbol + self.matched_by_ensembl + self.matched_by_ortholog

    @property
    def vocab_coverage(self) -> float:
        return self.num_matched / self.vocab_size

    def __str__(self) -> str:
        lines = [
            f"{self.num_matched:,} of {self.vocab_size:,} vocabulary genes found ({self.vocab_coverage:.1%}) among "
            f"{self.num_input_genes:,} input genes: {self.matched_by_symbol:,} by symbol, "
            f"{self.matched_by_ensembl:,} by Ensembl id, {self.matched_by_ortholog:,} by mouse-human ortholog; "
            f"{self.unmatched:,} input genes are not in the vocabulary and are left out.",
        ]
        if self.duplicates_dropped:
            lines.append(
                f"{len(self.duplicates_dropped):,} input genes map to a vocabulary gene already matched and are left "
                f"out (first: {', '.join(self.duplicates_dropped[:5])})."
            )
        if self.normalization:
            lines.append(f"Values: {self.normalization}")
        return "\n".join(lines)


def _read_gene_table(path: str | os.PathLike) -> list[tuple[str, str]]:
    with gzip.open(path, "rt", newline="") as handle:
        reader = csv.reader(handle)
        next(reader)
        return [(row[0], row[1]) for row in reader]


def _ensembl_ids_of(names: Sequence[str]) -> list[str]:
    """The Ensembl ids among the first names, when they are most of them (else [])."""
    sample = [str(n) for n in names[:200]]
    ensembl = [n for n in sample if ENSEMBL_PATTERN.match(n)]
    return ensembl if len(ensembl) > len(sample) / 2 else []


def _ensembl_species(ensembl_id: str) -> str:
    stable_id = ensembl_id.upper()
    if stable_id.startswith("ENSMUSG"):
        return "mouse"
    # "ENSG0", not "ENSG": chicken ids (ENSGALG...) start with ENSG too.
    return "human" if stable_id.startswith("ENSG0") else "other species'"


def _warn_about_legacy_augmentation(settings: dict[str, Any]) -> None:
    """Older tokenizers sampled unexpressed genes themselves; their saved `zero_fraction` no longer applies."""
    zero_fraction = settings.get("zero_fraction") or 0.0
    if zero_fraction > 0:
        logger.warning(
            f"zero_fraction={zero_fraction} (a setting of older tokenizers) is ignored: the tokenizer is deterministic "
            "and sampling unexpressed genes for augmentation is done by the training collator."
        )


def _refuse_special_token_names(genes: Sequence[str]) -> None:
    clashes = sorted(set(genes) & set(SPECIAL_TOKENS))
    if clashes:
        raise ValueError(f"Gene names {clashes} clash with the special tokens {SPECIAL_TOKENS}.")


def describe_gene_ids(names: Sequence[str]) -> str:
    """A short guess of the identifier style, used in error messages."""
    sample = [str(n) for n in names[:200]]
    if not sample:
        return "no gene names"
    if all(n.isdigit() for n in sample):
        return "numbers (Entrez ids or a default integer index?)"
    ensembl = _ensembl_ids_of(sample)
    if ensembl:
        return f"{_ensembl_species(ensembl[0])} Ensembl ids (e.g. {ensembl[0]})"
    return f"symbols (e.g. {', '.join(sample[:3])})"


class GeneExpressionTokenizer(PushToHubMixin):
    """Turns cells x genes expression into model inputs for scBERT (``mode="scbert"``) or scBERT 2.0 (``"scbert2"``).

    Args:
        genes: the vocabulary's gene symbols, in order (scBERT v1: the order of its positional table).
        mode: ``"scbert"`` or ``"scbert2"``.
        num_bins: expression bins 1..num_bins (0 means not expressed); scBERT uses 5.
        max_length: scBERT 2.0 only: keep at most this many tokens per cell (CLS included), the most expressed genes.
        add_cls_token: scBERT 2.0 only: put a CLS token first.
        min_overlap: refuse inputs that cover less than this fraction of the vocabulary.
        target_sum: counts are scaled to this total per cell before log2(1 + x).
        input_log_base: base of the logarithm of inputs that are already log-normalised (scanpy's log1p: e).
        selected_genes: scBERT 2.0 only: vocabulary genes a cell's tokens are drawn from (e.g. the highly variable
            genes of the fine-tuning data), so the length budget goes to informative genes rather than to the most
            expressed housekeeping ones. A cell expressing none of them keeps its most expressed genes.

    The gene tables used to match Ensembl ids and orthologs are the package's copy, or those saved in the folder
    the tokenizer was loaded from.
    """

    model_input_names = ["input_ids", "values", "bin_ids", "attention_mask"]
    _auto_class: str | None = None

    def __init__(
        self,
        genes: Sequence[str],
        mode: str = "scbert2",
        num_bins: int = 5,
        max_length: int | None = 2048,
        add_cls_token: bool = True,
        min_overlap: float = 0.5,
        target_sum: float = 1e4,
        input_log_base: float = math.e,
        selected_genes: Sequence[str] | None = None,
        **unused_kwargs: Any,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        genes = [str(g) for g in genes]
        if not genes:
            raise ValueError("The vocabulary needs at least one gene; got an empty gene list.")
        _refuse_special_token_names(genes)
        keys = [g.upper() for g in genes]
        if len(set(keys)) != len(keys):
            repeated = sorted({k for k in keys if keys.count(k) > 1})[:5] if len(keys) < 50_000 else []
            raise ValueError(f"The vocabulary has duplicate gene symbols (case-insensitive), e.g. {repeated}.")
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}.")
        if not 0.0 <= min_overlap <= 1.0:
            raise ValueError(f"min_overlap must be in [0, 1], got {min_overlap}.")
        self.genes = genes
        self.mode = mode
        self.num_bins = num_bins
        self.max_length = max_length
        self.add_cls_token = add_cls_token
        self.min_overlap = min_overlap
        self.target_sum = target_sum
        self.input_log_base = input_log_base
        self.name_or_path = ""
        self._gene_table_files = {name: GENE_TABLE_DIR / name for name in GENE_TABLE_FILES}
        self._index_by_key = {key: i for i, key in enumerate(keys)}
        self.last_report: GeneMatchReport | None = None
        self.selected_genes = selected_genes
        _warn_about_legacy_augmentation(unused_kwargs)

    @property
    def max_length(self) -> int | None:
        return self._max_length

    @max_length.setter
    def max_length(self, max_length: int | None) -> None:
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 or None, got {max_length}.")
        self._max_length = max_length

    @property
    def selected_genes(self) -> list[str] | None:
        return None if self._selected_ids is None else [self.genes[i - self.num_special_tokens] for i in self._selected_ids]

    @selected_genes.setter
    def selected_genes(self, genes: Sequence[str] | None) -> None:
        if genes is None:
            self._selected_ids = None
            return
        if self.mode != "scbert2":
            raise ValueError("selected_genes needs mode='scbert2': scBERT v1 always takes the full gene panel.")
        genes = [str(g) for g in genes]
        unknown = [g for g in genes if g.upper() not in self._index_by_key]
        if unknown or not genes:
            raise ValueError(f"selected_genes must be a non-empty list of vocabulary genes; not in the vocabulary: "
                             f"{unknown[:5]} ({len(unknown)} of {len(genes)}).")
        ids = np.asarray([self._index_by_key[g.upper()] for g in genes], dtype=np.int64) + self.num_special_tokens
        self._selected_ids = np.unique(ids)
        self._selected_ids.setflags(write=False)  # shared through `selected_token_ids`: change it via selected_genes

    @property
    def selected_token_ids(self) -> np.ndarray | None:
        """Token ids of `selected_genes` (sorted, unique, read-only int64), or None when every gene may be drawn."""
        return self._selected_ids

    # ----------------------------------------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.genes)

    def __len__(self) -> int:
        return self.vocab_size

    pad_token, mask_token, cls_token = SPECIAL_TOKENS
    pad_token_id, mask_token_id, cls_token_id = range(len(SPECIAL_TOKENS))
    num_special_tokens = len(SPECIAL_TOKENS)

    @property
    def num_genes(self) -> int:
        return len(self.genes)

    @property
    def sequence_length(self) -> int:
        """scBERT v1 input length: every vocabulary gene plus the trailing extra token."""
        return self.num_genes + 1

    def get_vocab(self) -> dict[str, int]:
        tokens = list(SPECIAL_TOKENS) + self.genes
        return {token: i for i, token in enumerate(tokens)}

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.convert_tokens_to_ids([tokens])[0]
        vocab = self.get_vocab()
        missing = [t for t in tokens if t not in vocab]
        if missing:
            raise KeyError(f"Not in the vocabulary: {missing[:5]}")
        return [vocab[t] for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        tokens = list(SPECIAL_TOKENS) + self.genes
        if isinstance(ids, (int, np.integer)):
            return tokens[int(ids)]
        return [tokens[int(i)] for i in ids]

    def add_genes(self, gene_names: Sequence[str]) -> int:
        """Appends the named genes that the vocabulary does not already match (by symbol, Ensembl id or ortholog, as
        `match_genes` matches) and returns how many were added, as ``add_tokens`` does; the model's table then needs
        ``resize_token_embeddings(len(tokenizer))``. scBERT 2.0 only: scBERT v1's positional table fixes its panel."""
        if self.mode != "scbert2":
            raise ValueError("add_genes needs mode='scbert2': scBERT v1 reads a fixed gene panel in the order of its "
                             "positional table.")
        names = [str(g) for g in gene_names]
        _refuse_special_token_names(names)
        candidates, _ = self._find_candidates(names)
        added = 0
        for name, candidate in zip(names, candidates):
            if candidate < 0 and name.upper() not in self._index_by_key:  # the second of two case variants is matched
                self._index_by_key[name.upper()] = len(self.genes)
                self.genes.append(name)
                added += 1
        return added

    @classmethod
    def from_adata(cls, adata: Any, gene_key: str | None = None, **kwargs: Any) -> "GeneExpressionTokenizer":
        """A tokenizer whose vocabulary is the genes of ``adata`` (its ``var_names`` or ``var[gene_key]``)."""
        return cls(genes=cls._gene_names(adata, gene_key), **kwargs)

    # ----------------------------------------------------------------------------------------------- matching
    def match_genes(self, gene_names: Sequence[str]) -> tuple[np.ndarray, GeneMatchReport]:
        """Vocabulary index (0-based gene position, -1 if absent) of each input gene, and the report.

        Order of trust: the name itself (case-insensitive); for a human Ensembl id (version suffix ignored) its
        GENCODE symbol, then that symbol's one-to-one ortholog (human ids on a mouse vocabulary), both counted as
        matched by Ensembl id; for a symbol its one-to-one mouse-human ortholog. Two inputs for one vocabulary gene
        keep the first, by that order, and the others are reported.
        """
        names = [str(g) for g in gene_names]
        candidates, how = self._find_candidates(names)
        report = GeneMatchReport(num_input_genes=len(names), vocab_size=self.num_genes)
        vocab_index = np.full(len(names), -1, dtype=np.int64)
        taken = np.zeros(self.num_genes, dtype=bool)
        for method in (BY_SYMBOL, BY_ENSEMBL, BY_ENSEMBL_ORTHOLOG, BY_ORTHOLOG):
            for i in np.flatnonzero(how == method):
                if taken[candidates[i]]:
                    report.duplicates_dropped.append(names[i])
                    continue
                taken[candidates[i]] = True
                vocab_index[i] = candidates[i]
        matched = vocab_index >= 0
        report.matched_by_symbol = int(np.sum(matched & (how == BY_SYMBOL)))
        report.matched_by_ensembl = int(np.sum(matched & np.isin(how, (BY_ENSEMBL, BY_ENSEMBL_ORTHOLOG))))
        report.matched_by_ortholog = int(np.sum(matched & (how == BY_ORTHOLOG)))
        report.unmatched = int(np.sum(how == 0))
        if report.vocab_coverage < self.min_overlap:
            raise ValueError(self._low_overlap_message(names, report))
        return vocab_index, report

    def gene_token_ids(self, gene_names: Sequence[str]) -> np.ndarray:
        """Token id of each named gene (-1 if it is not in the vocabulary), matched as `match_genes` matches, without
        its coverage check: for short gene lists such as a drug's targets or a perturbed gene."""
        candidates, _ = self._find_candidates([str(g) for g in gene_names])
        return np.where(candidates >= 0, candidates + self.num_special_tokens, -1)

    def _find_candidates(self, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Each input's candidate vocabulary index (-1: none) and how it was found (a BY_* code, 0: not found)."""
        candidates = np.full(len(names), -1, dtype=np.int64)
        how = np.zeros(len(names), dtype=np.int8)

        def look_up(keys: dict[int, str], method: int) -> None:
            for i, key in keys.items():
                index = self._index_by_key.get(key)
                if index is not None and candidates[i] < 0:
                    candidates[i], how[i] = index, method

        look_up({i: name.upper() for i, name in enumerate(names)}, BY_SYMBOL)
        unresolved = [i for i in range(len(names)) if candidates[i] < 0]
        ensembl_ids = {i: match.group(1).upper() for i in unresolved if (match := ENSEMBL_PATTERN.match(names[i]))}
        human_symbols = {}
        if ensembl_ids:
            symbol_of = {e.upper(): s.upper() for e, s in self._gene_table(ENSEMBL_TABLE)}
            human_symbols = {i: symbol_of[e] for i, e in ensembl_ids.items() if e in symbol_of}
            look_up(human_symbols, BY_ENSEMBL)
        symbols = {i: names[i].upper() for i in unresolved if i not in ensembl_ids}
        if any(candidates[i] < 0 for i in [*human_symbols, *symbols]):
            partner = self._ortholog_partners()
            look_up({i: partner.get(s, "") for i, s in human_symbols.items()}, BY_ENSEMBL_ORTHOLOG)
            look_up({i: partner.get(s, "") for i, s in symbols.items()}, BY_ORTHOLOG)
        return candidates, how

    def _ortholog_partners(self) -> dict[str, str]:
        """Upper-case symbol -> its one-to-one ortholog in the other species (human <-> mouse)."""
        partner: dict[str, str] = {}
        for human, mouse in self._gene_table(ORTHOLOG_TABLE):
            partner[human.upper()] = mouse.upper()
            partner[mouse.upper()] = human.upper()
        return partner

    def _gene_table(self, name: str) -> list[tuple[str, str]]:
        path = self._gene_table_files[name]
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Gene table {name} is missing (looked for {path}): matching by Ensembl id or ortholog needs it, "
                f"matching by symbol does not. Load the tokenizer from a folder saved by a current version "
                f"(save_pretrained copies the tables into {GENE_TABLE_SUBFOLDER}/) or with the scbert-hf package "
                "installed."
            )
        return _read_gene_table(path)

    def _low_overlap_message(self, names: list[str], report: GeneMatchReport) -> str:
        ensembl = _ensembl_ids_of(names)
        if ensembl and _ensembl_species(ensembl[0]) != "human":
            fix = (
                f"{_ensembl_species(ensembl[0]).capitalize()} Ensembl ids cannot be mapped with the shipped tables "
                "(GENCODE v44 is human-only): pass gene symbols instead (adata.var_names, or gene_key='a var column "
                "with symbols')."
            )
        else:
            fix = "Pass gene symbols or human Ensembl ids (adata.var_names, or gene_key='a var column with them')."
        # A threshold the input passes, for when the low overlap is intended.
        passing = math.floor(report.vocab_coverage * 100) / 100
        return (
            f"Too few genes match the vocabulary: {report}\nAt least {self.min_overlap:.0%} of the vocabulary is "
            f"required (min_overlap={self.min_overlap}). The input gene names look like {describe_gene_ids(names)}; "
            f"the vocabulary holds {describe_gene_ids(self.genes)}. {fix} If the low overlap is intended, lower the "
            f"threshold: min_overlap={passing} in Python (GeneExpressionTokenizer.from_pretrained(folder, "
            f"min_overlap={passing}) or tokenizer.min_overlap = {passing}), or --min_overlap {passing} with the "
            "training and annotation commands."
        )

    # ----------------------------------------------------------------------------------------------- values
    @staticmethod
    def _gene_names(adata: Any, gene_key: str | None) -> list[str]:
        if gene_key is not None:
            if gene_key not in adata.var.columns:
                raise KeyError(f"gene_key={gene_key!r} is not a column of adata.var (columns: {list(adata.var.columns)}).")
            names = adata.var[gene_key].astype(str).tolist()
        else:
            names = adata.var_names.astype(str).tolist()
        if not names:
            raise ValueError("The input has no genes (0 columns).")
        if all(n.isdigit() for n in names):
            raise ValueError(
                "The genes have no names: var_names are integers 0..n-1 (or numeric ids). Set adata.var_names to gene "
                "symbols or Ensembl ids, or pass gene_key='the var column holding them'."
            )
        seen: set[str] = set()
        repeated = [n for n in names if n in seen or seen.add(n)]
        if repeated:
            raise ValueError(
                f"{len(repeated)} gene names occur more than once (e.g. {sorted(set(repeated))[:5]}). Each column must "
                "be one gene: sum or drop the duplicates first (adata.var_names_make_unique() keeps them apart)."
            )
        return names

    def normalize(self, matrix: Any) -> tuple[sp.csr_matrix, str]:
        """log2(1 + x) of the counts scaled to ``target_sum`` per cell, for raw counts or log-normalised input."""
        # A copy: the conversions below work in place, and a float32 CSR input would otherwise be the caller's matrix.
        X = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
        X.sum_duplicates()
        if X.shape[0] == 0:
            raise ValueError("The input has no cells (0 rows).")
        data = X.data
        if not np.all(np.isfinite(data)):
            bad_cells = np.unique(np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))[~np.isfinite(data)])
            raise ValueError(
                f"The expression matrix holds NaN or infinite values in {len(bad_cells)} cells "
                f"(first rows: {bad_cells[:5].tolist()}). Expected finite raw counts or log-normalised values."
            )
        if data.size and data.min() < 0:
            raise ValueError(
                f"The expression matrix holds negative values (min {data.min():.3g}): it looks scaled or z-scored "
                "(e.g. after sc.pp.scale). Pass raw counts or log-normalised values (adata.raw or a counts layer)."
            )
        totals = np.asarray(X.sum(axis=1)).ravel()
        empty = np.flatnonzero(totals == 0)
        if empty.size:
            raise ValueError(
                f"{empty.size} cells have no expressed genes (first rows: {empty[:5].tolist()}). Remove them first, "
                "e.g. sc.pp.filter_cells(adata, min_genes=1)."
            )
        X.eliminate_zeros()
        if np.all(np.mod(X.data, 1) == 0):
            X = sp.csr_matrix(sp.diags(self.target_sum / totals) @ X, dtype=np.float32)
            np.log1p(X.data, out=X.data)
            X.data /= math.log(2)
            return X, f"raw counts detected: normalised to {self.target_sum:g} per cell, then log2(1 + x)."
        if X.data.max() > MAX_LOG_VALUE:
            X = sp.csr_matrix(sp.diags(self.target_sum / totals) @ X, dtype=np.float32)
            np.log1p(X.data, out=X.data)
            X.data /= math.log(2)
            return X, (
                f"non-integer values up to {X.data.max():.3g} (not logged, e.g. TPM) detected: rescaled to "
                f"{self.target_sum:g} per cell, then log2(1 + x)."
            )
        X.data *= np.float32(math.log(self.input_log_base) / math.log(2))
        return X, f"log-normalised values detected (base {self.input_log_base:.4g}): converted to log2 units."

    def encode_matrix(self, adata_or_matrix: Any, gene_names: Sequence[str] | None = None,
                      gene_key: str | None = None) -> sp.csr_matrix:
        """Cells x vocabulary-genes CSR matrix of log2 normalised values: the sparse form every mode starts from."""
        matrix, names = self._matrix_and_genes(adata_or_matrix, gene_names, gene_key)
        selector, report = self.vocabulary_selector(names)
        X, report.normalization = self.normalize(matrix)
        self.last_report = report
        logger.info(str(report))
        return sp.csr_matrix(X @ selector)

    def vocabulary_selector(self, gene_names: Sequence[str]) -> tuple[sp.csr_matrix, GeneMatchReport]:
        """The ``[input genes, vocabulary genes]`` 0/1 matrix that maps an input's columns onto the vocabulary (a
        matrix product), and the match report; for inputs read in chunks, which share one gene list."""
        vocab_index, report = self.match_genes(gene_names)
        keep = np.flatnonzero(vocab_index >= 0)
        selector = sp.csr_matrix(
            (np.ones(keep.size, dtype=np.float32), (keep, vocab_index[keep])), shape=(len(vocab_index), self.num_genes)
        )
        return selector, report

    def _matrix_and_genes(self, data: Any, gene_names: Sequence[str] | None, gene_key: str | None):
        if hasattr(data, "X") and hasattr(data, "var_names") and hasattr(data, "obs"):
            if data.X is None:
                raise ValueError("adata.X is empty (None): put the expression matrix in .X.")
            return data.X, self._gene_names(data, gene_key)
        if isinstance(data, (np.ndarray, sp.spmatrix, sp.sparray)):
            if gene_names is None:
                raise ValueError(
                    "A bare matrix has no gene names: pass gene_names=[...] (one per column) or an AnnData."
                )
            if data.ndim != 2 or data.shape[1] != len(gene_names):
                raise ValueError(
                    f"The matrix has shape {data.shape} but {len(gene_names)} gene names were given: expected a "
                    "2-D cells x genes matrix with one name per column."
                )
            names = [str(g) for g in gene_names]
            if len(set(names)) != len(names):
                raise ValueError("gene_names has duplicates: each column must be one gene.")
            return data, names
        raise TypeError(
            f"Expected an anndata.AnnData (cells x genes) or a numpy/scipy matrix with gene_names, got "
            f"{type(data).__name__}."
        )

    # ----------------------------------------------------------------------------------------------- batches
    def bin_values(self, values: np.ndarray) -> np.ndarray:
        """scBERT's binning of log2 values: min(floor(value), num_bins), so 0 stays 0."""
        return np.minimum(np.floor(values), self.num_bins).astype(np.int64)

    def collate(
        self, cells: Sequence[dict[str, Any]], return_tensors: str | None = "pt", packed: bool = False,
        pad_to_multiple_of: int | None = None,
    ) -> BatchEncoding:
        """Pads a list of sparse cells ({"gene_ids", "values"[, "label"]}) into one model batch for this mode.

        ``gene_ids`` are token ids (genes start after the special tokens), as stored by ``to_dataset``.

        With ``packed=True`` (``mode="scbert2"`` only) nothing is padded: the cells are concatenated into one row
        ``[1, total_tokens]`` (each keeps its CLS first), with ``position_ids`` restarting at 0 per cell,
        ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32 cell boundaries, ``[num_cells + 1]``) and
        ``max_length_q``/``max_length_k`` (python ints), the padding-free inputs of transformers' flash attention
        (as ``DataCollatorWithFlattening`` builds them), and no ``attention_mask``. ``labels`` stay one per cell.

        ``pad_to_multiple_of`` (padded ``mode="scbert2"`` batches) rounds the padded length up to a multiple of it, as
        transformers' tokenizers do: fewer distinct shapes for kernels that keep state per shape.
        """
        if not cells:
            raise ValueError("collate got an empty list of cells.")
        if pad_to_multiple_of is not None and (pad_to_multiple_of < 1 or packed or self.mode != "scbert2"):
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} needs a positive int and padded cells of "
                             f"mode='scbert2' (got mode={self.mode!r}, packed={packed}).")
        if packed and self.mode != "scbert2":
            raise ValueError(
                f"packed=True needs mode='scbert2', got mode={self.mode!r}: scBERT v1 takes every vocabulary gene in "
                "fixed positions, so its cells all have the same length and there is no padding to remove."
            )
        if self.mode == "scbert":
            batch = self._collate_full_panel(cells)
        else:
            batch = self._collate_expressed(cells, packed, pad_to_multiple_of or 1)
        if "label" in cells[0]:
            batch["labels"] = np.asarray([cell["label"] for cell in cells], dtype=np.int64)
        encoding = BatchEncoding(batch, tensor_type=return_tensors)
        if packed:
            # Set after the tensor conversion: flash attention's varlen kernel takes the maximum lengths as ints.
            encoding["max_length_q"] = encoding["max_length_k"] = int(np.diff(batch["cu_seq_lens_q"]).max())
        return encoding

    def _collate_full_panel(self, cells: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        # scBERT's trailing extra token (bin 0) stays in the last column.
        input_ids = np.zeros((len(cells), self.sequence_length), dtype=np.int64)
        for row, cell in enumerate(cells):
            positions = np.asarray(cell["gene_ids"], dtype=np.int64) - self.num_special_tokens
            input_ids[row, positions] = self.bin_values(np.asarray(cell["values"], dtype=np.float32))
        return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}

    def _gene_budget(self) -> tuple[int, int | None]:
        """The CLS offset (1 or 0) and how many genes a cell keeps at most (None: all)."""
        offset = 1 if self.add_cls_token else 0
        return offset, None if self.max_length is None else self.max_length - offset

    def _collate_expressed(self, cells: Sequence[dict[str, Any]], packed: bool, multiple: int) -> dict[str, np.ndarray]:
        offset, budget = self._gene_budget()
        chosen = [self._select_genes(cell, budget) for cell in cells]
        if packed:
            return self._pack_expressed(chosen, offset)
        length = -(-(offset + max(len(ids) for ids, _ in chosen)) // multiple) * multiple  # ceil to the multiple
        input_ids = np.full((len(cells), length), self.pad_token_id, dtype=np.int64)
        values = np.zeros((len(cells), length), dtype=np.float32)
        attention_mask = np.zeros((len(cells), length), dtype=np.int64)
        if self.add_cls_token:
            input_ids[:, 0] = self.cls_token_id
            attention_mask[:, 0] = 1
        for row, (ids, vals) in enumerate(chosen):
            input_ids[row, offset:offset + len(ids)] = ids
            values[row, offset:offset + len(ids)] = vals
            attention_mask[row, offset:offset + len(ids)] = 1
        return {
            "input_ids": input_ids,
            "values": values,
            "bin_ids": self.bin_values(values),
            "attention_mask": attention_mask,
        }

    def _pack_expressed(self, chosen: list[tuple[np.ndarray, np.ndarray]], offset: int) -> dict[str, np.ndarray]:
        cls_ids = np.full(offset, self.cls_token_id, dtype=np.int64)
        cls_values = np.zeros(offset, dtype=np.float32)
        input_ids = np.concatenate([np.concatenate([cls_ids, ids]) for ids, _ in chosen])
        values = np.concatenate([np.concatenate([cls_values, vals]) for _, vals in chosen])
        lengths = np.asarray([offset + len(ids) for ids, _ in chosen], dtype=np.int64)
        cu_seq_lens = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        # Each token's index in the row minus its cell's start: 0, 1, ... restarting at every cell.
        position_ids = np.arange(len(input_ids), dtype=np.int64) - np.repeat(cu_seq_lens[:-1].astype(np.int64), lengths)
        return {
            "input_ids": input_ids[None],  # [T] -> [1, T]
            "values": values[None],  # [T] -> [1, T]
            "bin_ids": self.bin_values(values)[None],  # [T] -> [1, T]
            "position_ids": position_ids[None],  # [T] -> [1, T]
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens.copy(),
        }

    def token_lengths(self, X: sp.csr_matrix) -> np.ndarray:
        """Tokens each row of a cells x vocabulary matrix gets from `collate` (CLS included, padding not): the
        lengths to batch cells by, which the expressed genes alone overstate where genes are selected or capped."""
        if self.mode != "scbert2":
            return np.full(X.shape[0], self.sequence_length, dtype=np.int64)
        expressed = np.diff(X.indptr)
        if self._selected_ids is not None:
            selected = np.diff(X[:, self._selected_ids - self.num_special_tokens].tocsr().indptr)
            expressed = np.where(selected > 0, selected, expressed)  # as _select_genes: none selected, all kept
        offset, budget = self._gene_budget()
        return offset + (expressed if budget is None else np.minimum(expressed, budget))

    def _select_genes(self, cell: dict[str, Any], budget: int | None) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(cell["gene_ids"], dtype=np.int64)
        vals = np.asarray(cell["values"], dtype=np.float32)
        if self._selected_ids is not None:
            selected = np.isin(ids, self._selected_ids, assume_unique=True)
            if selected.any():
                ids, vals = ids[selected], vals[selected]
        order = np.argsort(ids, kind="stable")
        ids, vals = ids[order], vals[order]
        if budget is not None and len(ids) > budget:
            # The most expressed genes; ties (common in counts) go to the lower gene id, whatever order the cell's
            # genes came in, so an annotated cell gets the tokens it got in fine-tuning.
            keep = np.sort(np.argsort(-vals, kind="stable")[:budget])
            ids, vals = ids[keep], vals[keep]
        return ids, vals

    def __call__(
        self,
        adata_or_matrix: Any,
        gene_names: Sequence[str] | None = None,
        gene_key: str | None = None,
        return_tensors: str | None = None,
    ) -> BatchEncoding:
        """Model inputs for every cell of an AnnData (or a cells x genes matrix with ``gene_names``)."""
        X = self.encode_matrix(adata_or_matrix, gene_names, gene_key)
        return self.collate(list(self._iter_cells(X)), return_tensors=return_tensors)

    def _iter_cells(self, X: sp.csr_matrix):
        for row in range(X.shape[0]):
            start, end = X.indptr[row], X.indptr[row + 1]
            yield {"gene_ids": X.indices[start:end] + self.num_special_tokens, "values": X.data[start:end]}

    def to_dataset(self, adata: Any, label_key: str | None = None, gene_key: str | None = None,
                   save_path: str | os.PathLike | None = None):
        """The cells as a ``datasets.Dataset`` of sparse rows (``gene_ids``, ``values``[, ``label``]).

        The Arrow list columns are built straight from the CSR arrays. With ``save_path`` the dataset is written
        there and reopened memory-mapped. Labels come from ``adata.obs[label_key]`` as a ClassLabel feature.
        """
        import datasets
        import pyarrow as pa

        X = self.encode_matrix(adata, gene_key=gene_key)
        X.sort_indices()
        offsets = pa.array(X.indptr.astype(np.int64))
        columns = {
            "gene_ids": pa.LargeListArray.from_arrays(offsets, pa.array(X.indices.astype(np.int32) + self.num_special_tokens)),
            "values": pa.LargeListArray.from_arrays(offsets, pa.array(X.data.astype(np.float32))),
        }
        features = {
            "gene_ids": datasets.LargeList(datasets.Value("int32")),
            "values": datasets.LargeList(datasets.Value("float32")),
        }
        if label_key is not None:
            if label_key not in adata.obs.columns:
                raise KeyError(f"label_key={label_key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}).")
            labels = adata.obs[label_key]
            if labels.isna().any():
                raise ValueError(f"adata.obs[{label_key!r}] has {int(labels.isna().sum())} missing labels.")
            names = sorted(labels.astype(str).unique())
            codes = np.searchsorted(names, labels.astype(str).to_numpy())
            columns["label"] = pa.array(codes.astype(np.int64))
            features["label"] = datasets.ClassLabel(names=names)
        table = pa.table(columns)
        dataset = datasets.Dataset(table).cast(datasets.Features(features))
        if save_path is not None:
            dataset.save_to_disk(str(save_path))
            dataset = datasets.load_from_disk(str(save_path))
        return dataset

    # ----------------------------------------------------------------------------------------------- save / load
    def _init_kwargs(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "num_bins": self.num_bins,
            "max_length": self.max_length,
            "add_cls_token": self.add_cls_token,
            "min_overlap": self.min_overlap,
            "target_sum": self.target_sum,
            "input_log_base": self.input_log_base,
            "selected_genes": self.selected_genes,
        }

    @classmethod
    def register_for_auto_class(cls, auto_class: str | type = "AutoTokenizer") -> None:
        """Registers the class with AutoTokenizer, as `PreTrainedTokenizerBase.register_for_auto_class` does.

        AutoTokenizer calls this on remote-code tokenizer classes. `save_pretrained` always writes the AutoTokenizer
        entry of ``auto_map``, so registering is only recorded here.
        """
        if not isinstance(auto_class, str):
            auto_class = auto_class.__name__
        if auto_class != "AutoTokenizer":
            raise ValueError(f"{cls.__name__} can only be registered with AutoTokenizer, got {auto_class!r}.")
        cls._auto_class = auto_class

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> tuple[str, ...]:
        """Writes vocab.json, tokenizer_config.json, this file and the gene tables (for ``trust_remote_code`` loading).

        ``push_to_hub=True`` then uploads the tokenizer to ``repo_id`` (default: the folder's name), as transformers
        tokenizers do; other keyword arguments (e.g. ``max_shard_size`` from ``push_to_hub``) do not apply here.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory} is a file, expected a folder.")
        os.makedirs(save_directory, exist_ok=True)
        vocab_path = os.path.join(save_directory, VOCAB_FILE)
        config_path = os.path.join(save_directory, TOKENIZER_CONFIG_FILE)
        with open(vocab_path, "w") as handle:
            json.dump(self.get_vocab(), handle, indent=0)
        config = {
            "tokenizer_class": type(self).__name__,
            "auto_map": {"AutoTokenizer": [f"{Path(__file__).stem}.{type(self).__name__}", None]},
            **self._init_kwargs(),
        }
        with open(config_path, "w") as handle:
            json.dump(config, handle, indent=2)
        shutil.copyfile(__file__, os.path.join(save_directory, Path(__file__).name))
        self._save_gene_tables(save_directory)
        if push_to_hub:
            self.push_to_hub(kwargs.get("repo_id", Path(save_directory).name), token=kwargs.get("token"))
        return vocab_path, config_path

    def _save_gene_tables(self, save_directory: str | os.PathLike) -> None:
        table_dir = os.path.join(save_directory, GENE_TABLE_SUBFOLDER)
        os.makedirs(table_dir, exist_ok=True)
        for name, source in self._gene_table_files.items():
            target = os.path.join(table_dir, name)
            if not os.path.isfile(source):
                # e.g. re-saving, under remote code, a folder saved before the tables travelled with it.
                logger.warning(
                    f"{source} is missing, so the saved folder lacks it: loaded without this package, the folder's "
                    "tokenizer then matches genes by symbol only."
                )
            elif not (os.path.exists(target) and os.path.samefile(source, target)):  # re-saved into its own folder
                shutil.copyfile(source, target)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "GeneExpressionTokenizer":
        """Loads from a local folder or a Hub repository id; keyword arguments override the saved settings."""
        hub_kwargs = {k: kwargs.pop(k) for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        for k in ("trust_remote_code", "_commit_hash", "_from_auto", "_from_pipeline", "subfolder"):
            kwargs.pop(k, None)
        config_file = cached_file(pretrained_model_name_or_path, TOKENIZER_CONFIG_FILE, **hub_kwargs)
        vocab_file = cached_file(pretrained_model_name_or_path, VOCAB_FILE, **hub_kwargs)
        with open(config_file) as handle:
            config = json.load(handle)
        with open(vocab_file) as handle:
            vocab = json.load(handle)
        tokens = sorted(vocab, key=vocab.get)
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS or sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError(
                f"{vocab_file} is not a gene-expression vocabulary: expected ids 0..n-1 starting with {SPECIAL_TOKENS}."
            )
        config = {k: v for k, v in config.items() if k not in ("tokenizer_class", "auto_map")}
        config.update(kwargs)
        tokenizer = cls(genes=tokens[len(SPECIAL_TOKENS):], **config)
        tokenizer.name_or_path = str(pretrained_model_name_or_path)
        tokenizer._gene_table_files = cls._resolve_gene_tables(pretrained_model_name_or_path, hub_kwargs)
        return tokenizer

    @staticmethod
    def _resolve_gene_tables(pretrained_model_name_or_path: str | os.PathLike, hub_kwargs: dict[str, Any]) -> dict:
        """The folder's (or Hub repository's) gene tables; the package's copy for those it lacks (older folders)."""
        files = {}
        for name in GENE_TABLE_FILES:
            resolved = cached_file(
                pretrained_model_name_or_path, name, subfolder=GENE_TABLE_SUBFOLDER,
                _raise_exceptions_for_missing_entries=False, **hub_kwargs,
            )
            files[name] = Path(resolved) if resolved is not None else GENE_TABLE_DIR / name
        return files

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name_or_path={self.name_or_path!r}, mode={self.mode!r}, genes={self.num_genes}, "
            f"num_bins={self.num_bins}, max_length={self.max_length})"
        )

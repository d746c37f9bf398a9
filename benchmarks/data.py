"""Real cells for the benchmarks (Baron mouse pancreas) and each model family's view of them.

Every model sees the same cells: one sparse encoding (the project's tokenizer: counts scaled to 1e4 per cell, then
log2(1 + x)) from which each family's input builder makes its batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from tokenization import GeneExpressionTokenizer
from train.finetune import DEFAULTS as FINETUNE_DEFAULTS

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = "SCBERT_BENCH_DATA"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "celltype" / "baron_mouse_pancreas.h5ad"
LABEL_KEY = "cell_type1"
MAX_LENGTH = 2048  # scBERT 2.0's and Geneformer's token budget per cell
SCBERT_PANEL_GENES = 16906  # scBERT's gene panel; the model input adds one trailing token
GENEFORMER_VOCAB = 25426  # Geneformer's token dictionary (pad, mask and 25,424 genes)
GENEFORMER_SPECIAL_TOKENS = 2  # <pad> = 0, <mask> = 1
# train/finetune.py's defaults, the setting of the cross-validated macro-F1: the most expressed of the highly
# variable genes, up to a token budget.
ANNOTATION_HIGHLY_VARIABLE_GENES = FINETUNE_DEFAULTS["highly_variable_genes"]
ANNOTATION_MAX_LENGTH = FINETUNE_DEFAULTS["max_length"]


def data_path() -> Path:
    return Path(os.environ.get(DATA_ENV, DEFAULT_DATA))


@dataclass
class Cells:
    """The benchmark cells: the AnnData, the tokenizers built on its genes and the shared sparse encoding."""

    adata: ad.AnnData
    scbert2_tokenizer: GeneExpressionTokenizer
    scbert_tokenizer: GeneExpressionTokenizer
    encoded: sp.csr_matrix  # cells x genes, log2 normalised, sorted indices
    labels: np.ndarray
    num_labels: int
    seed: int = 0

    @classmethod
    def load(cls, path: Path | None = None, seed: int = 0) -> "Cells":
        path = path or data_path()
        if not path.exists():
            raise FileNotFoundError(f"Benchmark data not found at {path}; set {DATA_ENV} to the Baron .h5ad.")
        adata = ad.read_h5ad(path)
        names, labels = np.unique(adata.obs[LABEL_KEY].astype(str).to_numpy(), return_inverse=True)
        scbert2 = GeneExpressionTokenizer.from_adata(adata, mode="scbert2", max_length=MAX_LENGTH)
        scbert = GeneExpressionTokenizer.from_adata(adata, mode="scbert")
        encoded = scbert2.encode_matrix(adata)
        encoded.sort_indices()
        return cls(adata, scbert2, scbert, encoded, labels.astype(np.int64), len(names), seed)

    @property
    def num_cells(self) -> int:
        return self.adata.n_obs

    @property
    def vocab_size(self) -> int:
        return self.scbert2_tokenizer.vocab_size

    @cached_property
    def annotation_tokenizer(self) -> GeneExpressionTokenizer:
        """The tokenizer a model fine-tuned with train/finetune.py's defaults saves: the union of scanpy's Seurat and
        Cell Ranger highly variable genes (here of all benchmark cells), at most ANNOTATION_MAX_LENGTH tokens per cell."""
        from train.genes import highly_variable_genes

        genes = highly_variable_genes(self.encoded, self.scbert2_tokenizer, ANNOTATION_HIGHLY_VARIABLE_GENES)
        return GeneExpressionTokenizer.from_adata(self.adata, mode="scbert2", max_length=ANNOTATION_MAX_LENGTH,
                                                  selected_genes=genes)

    def expressed_genes(self) -> np.ndarray:
        return np.diff(self.encoded.indptr)

    def sample_rows(self, num_cells: int) -> np.ndarray:
        """The first `num_cells` of one seeded permutation of the cells, so smaller samples are inside larger ones
        (batch 1 cells are in the training batch, which is in the batch of 32)."""
        order = np.random.default_rng(self.seed).permutation(self.num_cells)
        return np.resize(order, num_cells)

    def sparse_cells(self, rows: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Rows in the tokenizer's sparse form: token ids of the expressed genes and their values."""
        X, offset = self.encoded, self.scbert2_tokenizer.num_special_tokens
        return [
            {"gene_ids": X.indices[X.indptr[r]:X.indptr[r + 1]] + offset, "values": X.data[X.indptr[r]:X.indptr[r + 1]]}
            for r in rows
        ]


# ------------------------------------------------------------------------------------------------ input builders
# Each takes (cells, rows) and returns the model's keyword inputs as CPU tensors, without labels.

def scbert_native_inputs(cells: Cells, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """scBERT binned input over the data's own genes: 14,877 Baron genes + the trailing token."""
    batch = cells.scbert_tokenizer.collate(cells.sparse_cells(rows))
    return {"input_ids": batch["input_ids"]}


def scbert_panel_inputs(cells: Cells, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """scBERT's full 16,906-gene panel + trailing token: panel genes the data lacks get bin 0 (not expressed),
    as scBERT's preprocessing does for missing genes."""
    ids = scbert_native_inputs(cells, rows)["input_ids"]
    missing = SCBERT_PANEL_GENES - (ids.shape[1] - 1)
    ids = torch.cat([ids[:, :-1], ids.new_zeros(ids.shape[0], missing), ids[:, -1:]], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def scbert2_inputs(cells: Cells, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """CLS + the expressed genes (at most 2,047, the most expressed), padded to the batch's longest cell."""
    return dict(cells.scbert2_tokenizer.collate(cells.sparse_cells(rows)))


def scbert2_annotation_inputs(cells: Cells, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """CLS + the cell's most expressed highly variable genes: what a fine-tuned annotation model reads."""
    return dict(cells.annotation_tokenizer.collate(cells.sparse_cells(rows)))


def geneformer_inputs(cells: Cells, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """Geneformer's rank-value encoding, approximated: the expressed genes ordered by normalised expression
    (Geneformer also divides each gene by its corpus-wide median first, which needs its pretraining corpus),
    truncated to 2,048 and right-padded. Gene token ids reuse the Baron gene order (all < Geneformer's vocab)."""
    ranked = []
    for cell in cells.sparse_cells(rows):
        order = np.argsort(-cell["values"], kind="stable")[:MAX_LENGTH]
        ranked.append(cell["gene_ids"][order] - cells.scbert2_tokenizer.num_special_tokens + GENEFORMER_SPECIAL_TOKENS)
    length = max(len(ids) for ids in ranked)
    input_ids = torch.zeros(len(ranked), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(ranked):
        input_ids[row, :len(ids)] = torch.from_numpy(ids.astype(np.int64))
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def token_counts(batches: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
    """(real, padded) tokens over the batches: what the model has to look at, and what it computes on."""
    padded = sum(b["input_ids"].numel() for b in batches)
    real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    return real, padded

"""Training data: `.h5ad` files tokenized once into a cached Arrow dataset, a length-grouped sampler, and the collators.

Every random choice about a training input (which genes a cell loses to dropout, which unexpressed genes it gains,
which values are masked) is made here, in a collator, from a generator seeded by (seed, epoch, the cells' dataset
rows): the tokenizer itself is deterministic, and a batch comes out the same whichever worker builds it and whether
or not the run was resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices

from tokenization import GeneExpressionTokenizer


def read_h5ad(path: str | os.PathLike, backed: bool = False):
    """Reads an .h5ad (``backed``: only obs and var into memory, the matrix stays on disk) with a clear error for a
    missing, empty or unreadable (e.g. truncated) file."""
    import anndata

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    if path.stat().st_size == 0:
        raise ValueError(f"Data file {path} is empty (0 bytes): expected an .h5ad written by anndata.")
    try:
        adata = anndata.read_h5ad(path, backed="r" if backed else None)
    except Exception as error:  # h5py/anndata raise many types for a corrupt file
        raise ValueError(f"Could not read {path} as .h5ad ({type(error).__name__}: {error}): expected an HDF5 file "
                         "written by anndata; a truncated file (an interrupted copy or download) reads this way too."
                         ) from error
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"Data file {path} holds no cells or no genes (shape {adata.shape}).")
    return adata


def default_cache_dir() -> Path:
    """Tokenized datasets go under the datasets cache (HF_DATASETS_CACHE / HF_HOME), never next to the input data,
    which may be read-only or shared."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "scbert"


def dataset_fingerprint(paths: Iterable[str | os.PathLike], tokenizer: GeneExpressionTokenizer, extra: str = "") -> str:
    """Identifies a tokenized dataset: the input files (path, size, mtime), the vocabulary and tokenizer settings."""
    digest = hashlib.sha256()
    for path in paths:
        stat = Path(path).stat()
        digest.update(f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    digest.update(json.dumps({"target_sum": tokenizer.target_sum, "input_log_base": tokenizer.input_log_base}).encode())
    digest.update(extra.encode())
    return digest.hexdigest()[:16]


def training_fingerprint(data: list[str], dataset, tokenizer: GeneExpressionTokenizer, extra: str = "") -> str:
    """Identifies the cells a run trains on and how they are tokenized (vocabulary, selected genes, length budget):
    what a checkpoint must share with the run that resumes it."""
    settings = json.dumps({"mode": tokenizer.mode, "max_length": tokenizer.max_length, "num_bins": tokenizer.num_bins,
                           "selected_genes": tokenizer.selected_genes, "cells": len(dataset)}) + extra
    if len(data) == 1 and Path(data[0]).is_dir():
        return hashlib.sha256((dataset._fingerprint + settings).encode()).hexdigest()[:16]
    return dataset_fingerprint(data, tokenizer, settings)


def load_tokenized_dataset(
    data: list[str],
    tokenizer: GeneExpressionTokenizer,
    label_key: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    label_names: list[str] | None = None,
):
    """Sparse cells (gene_ids, values[, label]) as a memory-mapped Arrow dataset, tokenized once and cached.

    ``data`` holds .h5ad files or one folder written by ``datasets.save_to_disk``. ``label_names`` fixes the label
    order (e.g. a pretrained classifier's); by default the sorted label names of the data are used.
    """
    import datasets

    if len(data) == 1 and Path(data[0]).is_dir():
        return datasets.load_from_disk(data[0])
    extra = f"label={label_key};names={label_names}"
    target = Path(cache_dir or default_cache_dir()) / f"cells-{dataset_fingerprint(data, tokenizer, extra)}"
    if target.exists():
        return datasets.load_from_disk(str(target))
    parts = []
    for path in data:
        adata = read_h5ad(path)
        if label_names is not None and label_key in adata.obs:
            unknown = sorted(set(adata.obs[label_key].astype(str)) - set(label_names))
            if unknown:
                raise ValueError(f"{path}: labels {unknown[:5]} are not among the model's labels {label_names}.")
        parts.append(tokenizer.to_dataset(adata, label_key=label_key))
    if label_key is not None:
        names = label_names or sorted({name for part in parts for name in part.features["label"].names})
        parts = [part if part.features["label"].names == names else _relabel(part, names) for part in parts]
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    dataset.save_to_disk(str(partial))
    os.replace(partial, target)
    return datasets.load_from_disk(str(target))


def _relabel(dataset, label_names: list[str]):
    """Re-codes the label column to the order of ``label_names``."""
    import datasets

    current = dataset.features["label"].names
    mapping = np.asarray([label_names.index(name) for name in current], dtype=np.int64)
    features = dataset.features.copy()
    features["label"] = datasets.ClassLabel(names=label_names)
    return dataset.map(lambda batch: {"label": mapping[np.asarray(batch["label"])].tolist()}, batched=True,
                       features=features)


def cell_lengths(dataset) -> np.ndarray:
    """Number of expressed vocabulary genes of every cell, read from the Arrow offsets (no rows decoded)."""
    import pyarrow.compute as pc

    column = dataset.data.table.column("gene_ids") if hasattr(dataset.data, "table") else dataset.data.column("gene_ids")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if dataset._indices is not None:
        lengths = lengths[dataset._indices.column(0).to_numpy()]
    return lengths


class LengthGroupedSampler(Sampler[int]):
    """Shuffles cells in megabatches sorted by length (transformers' grouping), reseeded by ``set_epoch``.

    Seeding by epoch makes the order of every epoch reproducible, which is what lets a resumed run skip exactly the
    batches it had already seen. With ``weights`` (one per cell) an epoch is instead as many draws with replacement,
    cell i drawn with probability proportional to ``weights[i]`` (e.g. class-balanced sampling), grouped the same way.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, weights: np.ndarray | None = None):
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.weights = None
        if weights is not None:
            weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
            if weights.shape != (len(self.lengths),) or not bool((weights >= 0).all()) or not weights.sum() > 0:
                raise ValueError(f"Sampling weights must be {len(self.lengths)} non-negative numbers (one per cell), "
                                 f"not all zero; got shape {tuple(weights.shape)}.")
            self.weights = weights

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is None:
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))
        drawn = torch.multinomial(self.weights, len(self.lengths), replacement=True, generator=generator).tolist()
        grouped = get_length_grouped_indices([self.lengths[i] for i in drawn], self.batch_size, generator=generator)
        return iter([drawn[i] for i in grouped])


class IndexedCells(torch.utils.data.Dataset):
    """The rows of a ``datasets.Dataset`` with their row number as ``"index"``: the collators seed a batch's random
    choices from the row numbers, so they do not depend on worker processes, prefetching or where a run resumed."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[int(index)], "index": int(index)}

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        rows = self.dataset.__getitems__([int(i) for i in indices])
        return [{**row, "index": int(i)} for row, i in zip(rows, indices)]


def make_loader(dataset, collate_fn: Callable, batch_size: int, shuffle: bool, seed: int, num_workers: int,
                sample_weights: np.ndarray | None = None) -> DataLoader:
    sampler = LengthGroupedSampler(cell_lengths(dataset), batch_size, seed, sample_weights) if shuffle else None
    return DataLoader(
        IndexedCells(dataset),
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        # Worker seeds are drawn from this generator, not from torch's global one, so starting an iterator (e.g. the
        # shortened one of a resumed run) does not shift the global random stream that Accelerate checkpoints.
        generator=torch.Generator().manual_seed(seed),
    )


def seed_for_batch(seed: int, epoch: int, cells: list[dict[str, Any]]) -> int | None:
    """A batch's random seed from (seed, epoch, the cells' dataset row numbers), or None without row numbers."""
    if "index" not in cells[0]:
        return None
    entropy = [seed, epoch, *(int(cell["index"]) for cell in cells)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def pack_padded_batch(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A padded batch as one padding-free row, the layout of ``tokenizer.collate(..., packed=True)``.

    Every per-token tensor [B, L] keeps its real tokens, cell after cell: [1, T]; per-cell tensors (class labels) stay
    as they are. Packing after the random choices were made on the padded batch gives both layouts the same inputs.
    """
    real = batch["attention_mask"].bool()
    lengths = real.sum(dim=1)
    cu_seq_lens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    packed = {key: value[real].unsqueeze(0) if value.shape == real.shape else value  # [B, L] -> [T] -> [1, T]
              for key, value in batch.items() if key != "attention_mask"}
    # Each token's index in the row minus its cell's start: 0, 1, ... restarting at every cell.
    starts = torch.repeat_interleave(cu_seq_lens[:-1].long(), lengths)
    packed["position_ids"] = (torch.arange(int(cu_seq_lens[-1])) - starts).unsqueeze(0)  # [T] -> [1, T]
    packed["cu_seq_lens_q"], packed["cu_seq_lens_k"] = cu_seq_lens, cu_seq_lens.clone()
    packed["max_length_q"] = packed["max_length_k"] = int(lengths.max())
    return packed


def tokens_in_batch(batch: dict[str, Any]) -> int:
    """Number of real (non-padding) tokens of a padded batch or a packed row."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "input_ids" in batch:
        return int(batch["input_ids"].numel())
    return 0  # precomputed cell embeddings (the synergy head's frozen encoder): no tokens


def cells_in_batch(batch: dict[str, Any]) -> int:
    """Number of cells of a padded batch or a packed row."""
    if "cu_seq_lens_q" in batch:
        return int(batch["cu_seq_lens_q"].shape[0]) - 1
    if "input_ids" in batch:
        return int(batch["input_ids"].shape[0])
    return int(batch["labels"].shape[0])  # a batch of precomputed cell embeddings: one row each


class _SeededCollator:
    """Shared by the collators: the epoch (set by the loop) and the optional packing of the finished batch."""

    def __init__(self, tokenizer: GeneExpressionTokenizer, seed: int, packed: bool):
        if packed and tokenizer.mode != "scbert2":
            raise ValueError("--packed needs scBERT 2.0 (mode='scbert2'): scBERT v1 cells all have the full panel's "
                             "length, so there is no padding to remove.")
        self.tokenizer = tokenizer
        self.seed = seed
        self.packed = packed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _finish(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        return pack_padded_batch(batch) if self.packed else batch


class MaskedExpressionCollator(_SeededCollator):
    """Batches for pretraining: scBERT 2.0 masked regression, or scBERT's original masked language modelling.

    scBERT 2.0: each cell first gains ``zero_fraction`` (a share of its expressed count) of randomly drawn unexpressed
    genes with value 0, so the model also learns to say "not expressed"; then a share ``mask_probability`` of the real
    gene tokens get ``value_mask``: the model sees the gene but not its value and predicts its bin and value.
    scBERT v1: as in scBERT's pretrain.py, 15% of the non-zero bins are chosen, 90% of those replaced by the mask token.

    With ``panels`` (token ids measured by each corpus file, see `train.corpus`), a cell carrying ``"panel"`` draws
    its unexpressed genes from its own file's panel: a gene its file did not measure is not an observed zero. scBERT
    v1 sees every panel position, so there such a gene's position carries the mask token instead of bin 0.

    When the cells carry their dataset row number (``"index"``, added by `make_loader`), a batch's generators are
    seeded by (``seed``, epoch, row numbers); without them, fresh entropy and torch's global generator are used.
    """

    def __init__(self, tokenizer: GeneExpressionTokenizer, mask_probability: float = 0.15,
                 replace_probability: float = 0.9, seed: int = 0, zero_fraction: float = 0.0, packed: bool = False,
                 panels: list[np.ndarray] | None = None):
        super().__init__(tokenizer, seed, packed)
        if not 0 < mask_probability < 1:
            raise ValueError(f"mask_probability must be in (0, 1), got {mask_probability}.")
        if not 0.0 <= zero_fraction <= 10.0:
            raise ValueError(f"zero_fraction must be in [0, 10], got {zero_fraction}.")
        if zero_fraction and tokenizer.mode != "scbert2":
            raise ValueError("zero_fraction applies to scBERT 2.0: scBERT v1 already sees every gene of its panel.")
        self.mask_probability = mask_probability
        self.replace_probability = replace_probability
        self.zero_fraction = zero_fraction
        self.panels = panels
        self._v1_measured = None if panels is None or tokenizer.mode != "scbert" else self._measured_positions(panels)

    def _measured_positions(self, panels: list[np.ndarray]) -> torch.Tensor:
        """[files, sequence_length] bool: the v1 positions each file measured (its trailing extra token included)."""
        measured = torch.zeros(len(panels), self.tokenizer.sequence_length, dtype=torch.bool)
        for row, token_ids in enumerate(panels):
            measured[row, torch.as_tensor(token_ids, dtype=torch.long) - self.tokenizer.num_special_tokens] = True
        measured[:, -1] = True
        return measured

    def __call__(self, cells: list[dict[str, Any]]) -> dict[str, Any]:
        batch_seed = seed_for_batch(self.seed, self.epoch, cells)
        files = [int(c["panel"]) for c in cells] if self._v1_measured is not None and "panel" in cells[0] else None
        generator = None if batch_seed is None else torch.Generator().manual_seed(batch_seed)
        if self.zero_fraction:
            # Without row numbers the zeros follow torch's global generator too, as the masks do.
            rng = np.random.default_rng(int(torch.randint(2**62, (1,))) if batch_seed is None else batch_seed)
            cells = [self._add_unexpressed_genes(cell, rng) for cell in cells]
        cells = [{"gene_ids": c["gene_ids"], "values": c["values"]} for c in cells]
        batch = dict(self.tokenizer.collate(cells, return_tensors="pt"))
        if self.tokenizer.mode == "scbert2":
            candidates = (batch["attention_mask"] == 1) & (batch["input_ids"] >= self.tokenizer.num_special_tokens)
        else:
            candidates = batch["input_ids"] > 0
        chosen = self._choose(candidates, generator)
        if self.tokenizer.mode == "scbert2":
            batch["value_mask"] = chosen
            batch["labels"] = torch.where(chosen, batch["bin_ids"], -100)
            batch["value_labels"] = batch["values"].clone()
            batch["values"] = batch["values"].masked_fill(chosen, 0.0)
            batch["bin_ids"] = batch["bin_ids"].masked_fill(chosen, 0)
        else:
            batch["labels"] = torch.where(chosen, batch["input_ids"], -100)
            replace = chosen & (torch.rand(chosen.shape, generator=generator) < self.replace_probability)
            batch["input_ids"] = batch["input_ids"].masked_fill(replace, self.tokenizer.num_bins + 1)
            if files is not None:
                batch["input_ids"] = batch["input_ids"].masked_fill(~self._v1_measured[files], self.tokenizer.num_bins + 1)
        return self._finish(batch)

    def _add_unexpressed_genes(self, cell: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """The cell's tokens (restricted to the tokenizer's selected genes when it expresses any) plus a sampled
        share of the genes it does not express, drawn from the selected genes (or, for a cell expressing none of
        them, from the others, so the tokenizer keeps the cell's own genes)."""
        ids = np.asarray(cell["gene_ids"], dtype=np.int64)
        values = np.asarray(cell["values"], dtype=np.float32)
        pool = self.tokenizer.selected_token_ids
        if pool is None:
            pool = np.arange(self.tokenizer.num_special_tokens, self.tokenizer.vocab_size)
        else:
            selected = np.isin(ids, pool, assume_unique=True)
            if selected.any():
                ids, values = ids[selected], values[selected]
            else:
                pool = np.setdiff1d(np.arange(self.tokenizer.num_special_tokens, self.tokenizer.vocab_size), pool)
        if self.panels is not None and "panel" in cell:
            pool = np.intersect1d(pool, self.panels[int(cell["panel"])], assume_unique=True)
        unexpressed = np.setdiff1d(pool, ids, assume_unique=True)
        n_zeros = min(int(round(self.zero_fraction * len(ids))), len(unexpressed))
        zeros = rng.choice(unexpressed, size=n_zeros, replace=False)
        return {"gene_ids": np.concatenate([ids, zeros]),
                "values": np.concatenate([values, np.zeros(n_zeros, dtype=np.float32)])}

    def _choose(self, candidates: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        chosen = candidates & (torch.rand(candidates.shape, generator=generator) < self.mask_probability)
        if not chosen.any() and candidates.any():
            # An all-ignored batch would make the loss NaN: mask one candidate instead.
            flat = candidates.flatten().nonzero().squeeze(1)  # (torch has no flatnonzero)
            chosen.view(-1)[flat[torch.randint(len(flat), (1,), generator=generator)]] = True
        return chosen


class ClassificationCollator(_SeededCollator):
    """Tokenizer batches with the cell labels.

    ``gene_dropout`` (training only) augments each cell by dropping that share of its expressed genes before the
    tokenizer keeps the most expressed ``max_length``: a cell is then seen with a different, sequencing-dropout-like
    subset of its genes every epoch, which keeps a classifier trained on a few thousand cells from memorising them.
    Seeded per batch as `MaskedExpressionCollator` is, so a resumed run sees the same batches.
    """

    def __init__(self, tokenizer: GeneExpressionTokenizer, gene_dropout: float = 0.0, seed: int = 0,
                 packed: bool = False):
        super().__init__(tokenizer, seed, packed)
        if not 0.0 <= gene_dropout < 1.0:
            raise ValueError(f"gene_dropout must be in [0, 1), got {gene_dropout}.")
        self.gene_dropout = gene_dropout

    def __call__(self, cells: list[dict[str, Any]]) -> dict[str, Any]:
        if self.gene_dropout > 0:
            rng = np.random.default_rng(seed_for_batch(self.seed, self.epoch, cells))
            cells = [self._drop_genes(cell, rng) for cell in cells]
        return self._finish(dict(self.tokenizer.collate(cells, return_tensors="pt")))

    def _drop_genes(self, cell: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        gene_ids, values = np.asarray(cell["gene_ids"]), np.asarray(cell["values"])
        keep = rng.random(len(gene_ids)) >= self.gene_dropout
        if not keep.any():
            keep[rng.integers(len(gene_ids))] = True  # a cell never loses every gene
        return {**cell, "gene_ids": gene_ids[keep], "values": values[keep]}

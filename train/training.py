"""The one training loop of the scBERT family, and what every training script shares.

Data: `.h5ad` files (or a saved `datasets` folder) are tokenized once into an Arrow dataset cached on disk under a
fingerprint of the inputs and the tokenizer settings, then memory-mapped. Batches come from a length-grouped sampler
so cells of similar gene counts share a batch (less padding for scBERT 2.0).

Loop: Accelerate does devices, mixed precision, gradient accumulation and distribution (DDP/FSDP/DeepSpeed come from
`accelerate config`, not from this file). Checkpoints are `accelerator.save_state` folders written under a temporary
name and renamed when complete, so a crash never leaves a half-written checkpoint that `--resume_from_checkpoint
latest` would pick.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import ProjectConfiguration
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Sampler
from transformers import Adafactor, AutoConfig, get_cosine_schedule_with_warmup
from transformers.trainer_pt_utils import get_length_grouped_indices

import modeling_scbert
from tokenization import GeneExpressionTokenizer

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
EMA_FILE = "ema_weights.safetensors"  # accelerate's register_for_checkpointing would pickle it


# ---------------------------------------------------------------------------------------------------- arguments
def add_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every training script shares."""
    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", required=True, help="run folder: checkpoints, logs, final model")
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                       help="default: the accelerate config's (accelerate launch), else no")
    group.add_argument("--per_device_batch_size", type=int, default=16)
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--optim", choices=["adamw", "adafactor"], default="adamw")
    group.add_argument("--learning_rate", type=float, default=1e-3)
    group.add_argument("--weight_decay", type=float, default=0.01)
    group.add_argument("--warmup_ratio", type=float, default=0.05)
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument("--num_epochs", type=int, default=1)
    group.add_argument("--max_steps", type=int, default=None, help="optimizer steps; overrides --num_epochs")
    group.add_argument("--checkpointing_steps", type=int, default=None, help="save_state every N optimizer steps")
    group.add_argument("--checkpoints_total_limit", type=int, default=2, help="keep only the newest N checkpoints")
    group.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    group.add_argument("--logging_steps", type=int, default=10)
    group.add_argument("--num_workers", type=int, default=1, help="DataLoader worker processes")
    group.add_argument("--cache_dir", default=None, help="where tokenized Arrow datasets are cached")
    group.add_argument("--no_progress_bar", action="store_true")
    group.add_argument("--ema_decay", type=float, default=0.0,
                       help="keep an exponential moving average of the weights with this decay per optimizer step "
                            "(e.g. 0.995; 0 = off): per-epoch evaluation, the best model and the final model use the "
                            "average, which does not swing with the last few batches as the trained weights do")
    group.add_argument("--gene_embedding_init", choices=["svd", "svd_whitened", "random"], default="svd",
                       help="scBERT 2.0 from scratch: gene vectors from a truncated SVD of the training cells "
                            "(svd: components weighted by their singular values; svd_whitened: every component "
                            "at the same scale, so the small ones, e.g. rare cell types' programmes, are not "
                            "drowned out)")
    group.add_argument("--gene_embedding_std", type=float, default=0.5)
    group.add_argument("--highly_variable_genes", type=int, default=0,
                       help="scBERT 2.0: draw each cell's tokens from this many highly variable genes of the training "
                            "cells (0: the most expressed of all genes); saved with the tokenizer, so inference with "
                            "the saved folder selects the same genes")
    return parser


# ---------------------------------------------------------------------------------------------------- data
def read_h5ad(path: str | os.PathLike):
    """Reads an .h5ad with a clear error for a missing, empty or unreadable file."""
    import anndata

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    if path.stat().st_size == 0:
        raise ValueError(f"Data file {path} is empty (0 bytes): expected an .h5ad written by anndata.")
    try:
        adata = anndata.read_h5ad(path)
    except Exception as error:  # h5py/anndata raise many types for a corrupt file
        raise ValueError(f"Could not read {path} as .h5ad ({type(error).__name__}: {error}).") from error
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"Data file {path} holds no cells or no genes (shape {adata.shape}).")
    return adata


def dataset_fingerprint(paths: Iterable[str | os.PathLike], tokenizer: GeneExpressionTokenizer, extra: str = "") -> str:
    """Identifies a tokenized dataset: the input files (path, size, mtime), the vocabulary and tokenizer settings."""
    digest = hashlib.sha256()
    for path in paths:
        stat = Path(path).stat()
        digest.update(f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    settings = tokenizer._init_kwargs()
    digest.update(json.dumps({k: settings[k] for k in ("target_sum", "input_log_base")}).encode())
    digest.update(extra.encode())
    return digest.hexdigest()[:16]


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
    cache_dir = Path(cache_dir or Path(data[0]).resolve().parent / ".scbert_cache")
    extra = f"label={label_key};names={label_names}"
    target = cache_dir / f"cells-{dataset_fingerprint(data, tokenizer, extra)}"
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
    masking from the row numbers, so it does not depend on worker processes, prefetching or where a run resumed."""

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


class MaskedExpressionCollator:
    """Batches for pretraining: scBERT 2.0 masked regression, or scBERT's original masked language modelling.

    scBERT 2.0: a share ``mask_probability`` of the real gene tokens (expressed, and sampled zeros if the tokenizer
    adds them) get ``value_mask``; the model sees the gene but not its value and predicts its bin and value.
    scBERT v1: as in scBERT's pretrain.py, 15% of the non-zero bins are chosen, 90% of those replaced by the mask token.

    Randomness (the masks and the tokenizer's sampled zeros): when the cells carry their dataset row number
    (``"index"``, added by `make_loader`), a batch's generator is seeded by (``seed``, epoch, row numbers), so a batch
    is masked the same way whichever worker builds it and whether or not the run was resumed; `train_loop` calls
    ``set_epoch``. Without row numbers, torch's global generator is used.
    """

    def __init__(self, tokenizer: GeneExpressionTokenizer, mask_probability: float = 0.15, replace_probability: float = 0.9,
                 seed: int = 0):
        if not 0 < mask_probability < 1:
            raise ValueError(f"mask_probability must be in (0, 1), got {mask_probability}.")
        self.tokenizer = tokenizer
        self.mask_probability = mask_probability
        self.replace_probability = replace_probability
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, cells: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch_seed = seed_for_batch(self.seed, self.epoch, cells)
        generator = None
        if batch_seed is not None:
            generator = torch.Generator().manual_seed(batch_seed)
            self.tokenizer._rng = np.random.default_rng(batch_seed)  # the zeros sampled by `collate`
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
        return batch

    def _choose(self, candidates: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        chosen = candidates & (torch.rand(candidates.shape, generator=generator) < self.mask_probability)
        if not chosen.any() and candidates.any():
            # An all-ignored batch would make the loss NaN: mask one candidate instead.
            flat = candidates.flatten().nonzero().squeeze(1)  # (torch has no flatnonzero)
            chosen.view(-1)[flat[torch.randint(len(flat), (1,), generator=generator)]] = True
        return chosen


class ClassificationCollator:
    """Tokenizer batches with the cell labels.

    ``gene_dropout`` (training only) augments each cell by dropping that share of its expressed genes before the
    tokenizer keeps the most expressed ``max_length``: a cell is then seen with a different, sequencing-dropout-like
    subset of its genes every epoch, which keeps a classifier trained on a few thousand cells from memorising them.
    Seeded per batch as `MaskedExpressionCollator` is, so a resumed run sees the same batches.
    """

    def __init__(self, tokenizer: GeneExpressionTokenizer, gene_dropout: float = 0.0, seed: int = 0):
        if not 0.0 <= gene_dropout < 1.0:
            raise ValueError(f"gene_dropout must be in [0, 1), got {gene_dropout}.")
        self.tokenizer = tokenizer
        self.gene_dropout = gene_dropout
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, cells: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.gene_dropout > 0:
            batch_seed = seed_for_batch(self.seed, self.epoch, cells)
            rng = np.random.default_rng(batch_seed)
            cells = [self._drop_genes(cell, rng) for cell in cells]
        return dict(self.tokenizer.collate(cells, return_tensors="pt"))

    def _drop_genes(self, cell: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        gene_ids, values = np.asarray(cell["gene_ids"]), np.asarray(cell["values"])
        keep = rng.random(len(gene_ids)) >= self.gene_dropout
        if not keep.any():
            keep[rng.integers(len(gene_ids))] = True  # a cell never loses every gene
        return {**cell, "gene_ids": gene_ids[keep], "values": values[keep]}


# ---------------------------------------------------------------------------------------------------- models
def load_pretrained_folder(folder: str | os.PathLike, expected_types=("scbert", "scbert2")):
    """Reads a model folder's config and tokenizer, with a clear error for a folder of another model type."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json: expected a folder written by save_pretrained.")
    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in expected_types:
        raise ValueError(
            f"{folder} holds a {config.model_type!r} model; expected one of {expected_types} (an scBERT family folder)."
        )
    if not (folder / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"{folder} has no tokenizer files: save the tokenizer into the model folder.")
    return config, GeneExpressionTokenizer.from_pretrained(folder)


def architecture_config(architecture: str, tokenizer: GeneExpressionTokenizer, **overrides: Any):
    """A fresh config for ``architecture``: a scBERT 2.0 preset name, or ``scbert`` / ``scbert-small``."""
    if architecture.startswith("scbert2"):
        # Mean pooling: masked-regression pretraining never trains the CLS output, the gene tokens it does train.
        return modeling_scbert.ScBert2Config.from_preset(
            architecture, vocab_size=tokenizer.vocab_size, num_bins=tokenizer.num_bins, **{"pooling": "mean", **overrides}
        )
    if architecture in ("scbert", "scbert-small"):
        small = dict(dim=64, depth=2, heads=4, dim_head=16, nb_features=64) if architecture == "scbert-small" else {}
        return modeling_scbert.ScBertConfig(
            num_tokens=tokenizer.num_bins + 2, max_seq_len=tokenizer.sequence_length, **{**small, **overrides}
        )
    raise ValueError(f"Unknown architecture {architecture!r}: expected scbert, scbert-small or a preset of "
                     f"{sorted(modeling_scbert.configuration_scbert2.PRESETS)}.")


def architecture_mode(architecture: str) -> str:
    """The tokenizer mode an architecture reads: scBERT's full panel or scBERT 2.0's expressed genes."""
    return "scbert" if architecture in ("scbert", "scbert-small") else "scbert2"


# ---------------------------------------------------------------------------------------------------- tracking
class JSONLTracker(GeneralTracker):
    """Accelerate tracker appending every `accelerator.log` call as one JSON line (a local, dependency-free log)."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike):
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / f"{run_name}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        self._write({"config": values})

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self._write({"step": step, **values})

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")


def launched_on_cpu_only() -> bool:
    """Started as several processes (`accelerate launch --multi_gpu`, torchrun) on a machine without GPUs.

    Accelerate then needs ``cpu=True`` to join the processes with the gloo backend; without it every process would
    train alone as process 0 of 1 (all writing the same output folder).
    """
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator


def make_accelerator(args: argparse.Namespace, run_name: str) -> Accelerator:
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs"))
    accelerator = Accelerator(
        cpu=launched_on_cpu_only(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=[JSONLTracker(run_name, project.logging_dir)],
        project_config=project,
    )
    accelerator.init_trackers(run_name, config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))})
    return accelerator


# ---------------------------------------------------------------------------------------------------- checkpoints
def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (a folder still named *.partial was interrupted and is ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator: Accelerator, output_dir: str, state: dict, total_limit: int,
                    ema: torch.nn.Module | None = None) -> Path:
    root = Path(output_dir) / "checkpoints"
    final = root / f"checkpoint-{state['step']}"
    partial = root / f"{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()  # every process has written its random_states_<rank>.pkl before the rename
    if accelerator.is_main_process:
        if ema is not None:
            # Cloned so tensors shared inside the model (tied weights) are stored separately, as safetensors requires.
            save_file({name: t.detach().cpu().clone() for name, t in ema.state_dict().items()}, partial / EMA_FILE)
        (partial / STATE_FILE).write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in checkpoint_dirs(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(output_dir: str, resume_from: str | None) -> Path | None:
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE}).")
    return path


# ---------------------------------------------------------------------------------------------------- the loop
@dataclass
class LoopResult:
    step: int
    epoch: int
    best_metric: float | None
    stopped_early: bool
    seconds: float


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optim == "adafactor":
        return Adafactor(groups, lr=args.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW(groups, lr=args.learning_rate)


def exponential_moving_average(model: torch.nn.Module, decay: float) -> torch.nn.Module:
    """torch's AveragedModel keeping an EMA of ``model``'s parameters and buffers (``.module`` is the averaged model)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    if not 0.0 < decay < 1.0:
        raise ValueError(f"--ema_decay must be in (0, 1) (or 0 for no averaging), got {decay}.")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def train_loop(
    accelerator: Accelerator,
    model: torch.nn.Module,
    train_dataset,
    collate_fn: Callable,
    args: argparse.Namespace,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    metric_for_best: str | None = None,
    greater_is_better: bool = True,
    patience: int | None = None,
    on_new_best: Callable[[torch.nn.Module], None] | None = None,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    sample_weights: np.ndarray | None = None,
) -> LoopResult:
    """Trains ``model`` with Accelerate; evaluates once per epoch when ``evaluate`` is given.

    With ``metric_for_best`` (higher is better unless ``greater_is_better=False``) ``on_new_best`` is called on the
    unwrapped model at every improvement, and training stops after ``patience`` epochs without one. ``loss_fn(outputs, labels)`` replaces
    the model's own loss (the labels are then kept from the model). With ``sample_weights`` (one per training cell)
    every epoch is drawn with replacement in proportion to them (see `LengthGroupedSampler`). With ``args.ema_decay``
    the weight average is what gets evaluated and passed to ``on_new_best``, and it is copied into ``model`` at the end.
    """
    start = time.perf_counter()
    train_loader = make_loader(train_dataset, collate_fn, args.per_device_batch_size, True, args.seed, args.num_workers,
                               sample_weights)
    optimizer = build_optimizer(model, args)
    updates_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_steps = args.max_steps or args.num_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)
    # Accelerate's prepared scheduler steps num_processes times per optimizer step (as for a batch num_processes
    # times larger), so the schedule is laid out in those units.
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(args.warmup_ratio * max_steps) * accelerator.num_processes,
                                                max_steps * accelerator.num_processes)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    ema = exponential_moving_average(accelerator.unwrap_model(model), args.ema_decay) if args.ema_decay else None

    step, first_epoch, batches_done, best, stale = 0, 0, 0, None, 0
    checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / STATE_FILE).read_text())
        step, first_epoch, batches_done = state["step"], state["epoch"], state["batches_done"]
        best, stale = state.get("best_metric"), state.get("stale_epochs", 0)
        if ema is not None:
            if not (checkpoint / EMA_FILE).exists():
                raise FileNotFoundError(f"{checkpoint} has no {EMA_FILE}: it was saved by a run without --ema_decay; "
                                        "resume it without --ema_decay or start a new run.")
            ema.load_state_dict(load_file(checkpoint / EMA_FILE, device=str(accelerator.device)))
        accelerator.print(f"Resumed from {checkpoint} at step {step} (epoch {first_epoch}, batch {batches_done}).")

    progress = None
    if accelerator.is_local_main_process and not args.no_progress_bar:
        from tqdm.auto import tqdm

        progress = tqdm(total=max_steps, initial=step, desc="train", dynamic_ncols=True)

    stopped_early = False
    epoch = first_epoch
    # A checkpoint of a finished run (e.g. the last one, resumed again with `latest`) trains no further.
    for epoch in range(first_epoch, num_epochs if step < max_steps else first_epoch):
        model.train()
        train_loader.set_epoch(epoch)
        if hasattr(collate_fn, "set_epoch"):
            collate_fn.set_epoch(epoch)
        skip = batches_done if epoch == first_epoch else 0
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        window_start, window_cells, batch_index = time.perf_counter(), 0, skip
        for batch in loader:
            batch_index += 1
            with accelerator.accumulate(model):
                if loss_fn is None:
                    outputs = model(**batch)
                    loss = outputs.loss
                else:
                    labels = batch.pop("labels")
                    outputs = model(**batch)
                    loss = loss_fn(outputs, labels)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            window_cells += batch["attention_mask"].shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            if ema is not None:
                ema.update_parameters(accelerator.unwrap_model(model))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.4f}")
            if step % args.logging_steps == 0 or step == max_steps:
                elapsed = time.perf_counter() - window_start
                accelerator.log(
                    {**_loss_parts(outputs), "loss": loss.item(), "lr": scheduler.get_last_lr()[0], "epoch": epoch,
                     "cells_per_second": window_cells / max(elapsed, 1e-9)},
                    step=step,
                )
                window_start, window_cells = time.perf_counter(), 0
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, {
                    "step": step, "epoch": epoch, "batches_done": batch_index, "best_metric": best,
                    "stale_epochs": stale}, args.checkpoints_total_limit, ema)
            if step >= max_steps:
                break
        if evaluate is not None:
            metrics = evaluate(model if ema is None else ema.module)
            accelerator.log({f"eval_{k}": v for k, v in metrics.items()}, step=step)
            accelerator.print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if metric_for_best is not None:
                value = metrics[metric_for_best]
                if best is None or (value > best if greater_is_better else value < best):
                    best, stale = value, 0
                    if on_new_best is not None:
                        on_new_best(accelerator.unwrap_model(model) if ema is None else ema.module)
                else:
                    stale += 1
                if patience is not None and stale >= patience:
                    accelerator.print(f"Early stopping: no {metric_for_best} improvement in {patience} epochs.")
                    stopped_early = True
                    break
        if step >= max_steps:
            break
    if progress is not None:
        progress.close()
    if ema is not None:
        accelerator.unwrap_model(model).load_state_dict(ema.module.state_dict())
    return LoopResult(step=step, epoch=epoch, best_metric=best, stopped_early=stopped_early,
                      seconds=time.perf_counter() - start)


def _loss_parts(outputs) -> dict[str, float]:
    parts = {}
    for name in ("loss", "bin_loss", "value_loss", "aux_loss"):
        value = getattr(outputs, name, None)
        if value is not None:
            parts[name] = float(value.detach().float().item())
    return parts


@torch.inference_mode()
def predict(accelerator: Accelerator, model: torch.nn.Module, dataset, collate_fn: Callable, batch_size: int,
            num_workers: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits of every cell (in dataset order) and the labels when the dataset has them, gathered over processes."""
    loader = accelerator.prepare(make_loader(dataset, collate_fn, batch_size, False, 0, num_workers))
    model.eval()
    all_logits, all_labels = [], []
    for batch in loader:
        labels = batch.pop("labels", None)
        logits = model(**batch).logits
        logits = accelerator.gather_for_metrics(logits)
        all_logits.append(logits.float().cpu())
        if labels is not None:
            all_labels.append(accelerator.gather_for_metrics(labels).cpu())
    logits = torch.cat(all_logits).numpy()
    return logits, (torch.cat(all_labels).numpy() if all_labels else None)


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, names: list[str] | None = None) -> dict:
    """Accuracy and macro-F1 (plus, with ``names``, each class's F1 and the misclassified cells counted as
    "true -> predicted"): the project's one implementation (evaluate.load needs the Hub)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    metrics = {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
    }
    if names is not None:
        # Over every class, present here or not, so per-class numbers line up across folds.
        per_class = f1_score(labels, predictions, labels=np.arange(len(names)), average=None, zero_division=0)
        metrics["per_class_f1"] = {name: float(f1) for name, f1 in zip(names, per_class)}
        confusion = confusion_matrix(labels, predictions, labels=np.arange(len(names)))
        np.fill_diagonal(confusion, 0)
        metrics["errors"] = {f"{names[t]} -> {names[p]}": int(confusion[t, p]) for t, p in zip(*confusion.nonzero())}
    return metrics


def balanced_log_loss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Cross-entropy averaged within each class present, then over those classes: every class weighs the same, as in
    macro-F1, but a cell counts by how sure the model is of its true type rather than only by whether the argmax hit
    it, so it does not move in steps of one cell when a class has one or two cells to score."""
    log_probabilities = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1)
    losses = -log_probabilities[torch.arange(len(labels)), torch.as_tensor(labels)].numpy()
    return float(np.mean([losses[labels == c].mean() for c in np.unique(labels)]))


def save_model_folder(model, tokenizer: GeneExpressionTokenizer, folder: str | os.PathLike, accelerator: Accelerator | None = None) -> None:
    """save_pretrained of model and tokenizer into one folder (safetensors + config + tokenizer + source files)."""
    if accelerator is not None:
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return
        model = accelerator.unwrap_model(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------------- gene embeddings
def dataset_matrix(dataset, tokenizer: GeneExpressionTokenizer):
    """Cells x vocabulary-genes CSR matrix rebuilt from the Arrow list columns (offsets reused, no per-cell loop)."""
    import scipy.sparse as sp

    table = dataset.with_format("arrow")[:]
    genes, values = table.column("gene_ids").combine_chunks(), table.column("values").combine_chunks()
    offsets = np.asarray(genes.offsets) - genes.offsets[0].as_py()
    indices = np.asarray(genes.flatten()) - tokenizer.num_special_tokens
    data = np.asarray(values.flatten(), dtype=np.float32)
    return sp.csr_matrix((data, indices, offsets), shape=(len(dataset), tokenizer.num_genes))


def highly_variable_genes(matrix, tokenizer: GeneExpressionTokenizer, n_top_genes: int) -> list[str]:
    """Vocabulary genes among the ``n_top_genes`` most variable of a cells x genes matrix of log2 values by scanpy's
    Seurat or Cell Ranger dispersion flavour. Both rank dispersion within bins of mean expression, which drops some
    of the strongest markers from the top bin: on Baron pancreas Seurat's drops Gcg, Ppy and Cd3e, Cell Ranger's
    Ins1 and Ins2; the union keeps them all."""
    import anndata
    import scanpy as sc

    if n_top_genes < 1:
        raise ValueError(f"n_top_genes must be >= 1, got {n_top_genes}.")
    expressed = np.flatnonzero(np.asarray((matrix != 0).sum(axis=0)).ravel())
    if n_top_genes >= len(expressed):
        return [tokenizer.genes[i] for i in expressed]
    cells = anndata.AnnData(matrix[:, expressed] * np.float32(np.log(2)))  # scanpy expects natural-log values
    chosen = np.zeros(len(expressed), dtype=bool)
    for flavor in ("seurat", "cell_ranger"):
        sc.pp.highly_variable_genes(cells, n_top_genes=n_top_genes, flavor=flavor)
        chosen |= cells.var["highly_variable"].to_numpy()
    return [tokenizer.genes[i] for i in expressed[chosen]]


def select_highly_variable_genes(tokenizer: GeneExpressionTokenizer, dataset, args: argparse.Namespace) -> None:
    """Applies ``--highly_variable_genes`` to a scBERT 2.0 tokenizer (scBERT v1 reads the full gene panel)."""
    if args.highly_variable_genes and tokenizer.mode == "scbert2":
        tokenizer.selected_genes = highly_variable_genes(dataset_matrix(dataset, tokenizer), tokenizer,
                                                         args.highly_variable_genes)


def svd_gene_embeddings(matrix, hidden_size: int, std: float, seed: int, whiten: bool = False) -> np.ndarray:
    """Gene vectors from a truncated SVD of the cells' log-normalised expression, scaled to ``std``.

    Genes that co-vary across cells start close together, which a randomly initialised table of ~15k genes cannot
    learn from a few thousand cells in a few epochs. Uses only the cells given (no labels). ``whiten`` gives every
    component the same scale instead of weighting it by its singular value, so that small programmes (a rare cell
    type's) are not drowned out by the large ones.
    """
    from sklearn.decomposition import TruncatedSVD

    components = min(hidden_size, min(matrix.shape) - 1)
    svd = TruncatedSVD(n_components=components, random_state=seed).fit(matrix)
    vectors = np.zeros((matrix.shape[1], hidden_size), dtype=np.float32)
    vectors[:, :components] = svd.components_.T * (1.0 if whiten else svd.singular_values_)
    return vectors * (std / vectors.std())


def initialise_gene_embeddings(model, dataset, tokenizer: GeneExpressionTokenizer, args: argparse.Namespace) -> None:
    """Applies ``--gene_embedding_init svd`` / ``svd_whitened`` to a freshly built scBERT 2.0 model (scBERT v1 has
    no gene table)."""
    if args.gene_embedding_init.startswith("svd") and model.config.model_type == "scbert2":
        matrix = dataset_matrix(dataset, tokenizer)
        model.load_gene_embeddings(svd_gene_embeddings(matrix, model.config.hidden_size, args.gene_embedding_std,
                                                       args.seed, whiten=args.gene_embedding_init == "svd_whitened"))

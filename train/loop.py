"""The one training loop of the scBERT family, in the style of accelerate's `examples/nlp_example.py`.

Accelerate does devices, mixed precision, gradient accumulation and distribution (DDP/FSDP/DeepSpeed come from
`accelerate config`, not from this file). What a model or task needs of the loop goes through a hook,
``compute_loss(model, batch) -> (loss, outputs)``, which sees the whole batch (a teacher model, a task head's extra
inputs). Early stopping and checkpoints are small objects. A checkpoint is an `accelerator.save_state` folder written
under a temporary name and renamed when complete, and it records the run it belongs to (data, architecture,
vocabulary): it is only resumed by the same run.
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
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import ProjectConfiguration
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import Adafactor, get_cosine_schedule_with_warmup

from train.data import cells_in_batch, tokens_in_batch

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
EMA_FILE = "ema_weights.safetensors"  # accelerate's register_for_checkpointing would pickle it
ATTENTION_BACKENDS = ("eager", "sdpa", "flash_attention_2", "flex_attention")


# ---------------------------------------------------------------------------------------------------- arguments
def add_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every training script shares."""
    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", required=True, help="run folder: checkpoints, logs, final model")
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                       help="default: the accelerate config's (accelerate launch), else no")
    group.add_argument("--attn_implementation", choices=ATTENTION_BACKENDS, default=None,
                       help="scBERT 2.0 attention backend (default: the model's, sdpa); flash_attention_2 needs a GPU "
                            "and the flash-attn package, and pairs with --packed")
    group.add_argument("--packed", action="store_true",
                       help="scBERT 2.0: padding-free batches, every cell of a batch concatenated into one row")
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
    group.add_argument("--resume_from_checkpoint", default=None,
                       help="'latest' or a checkpoint folder; only a checkpoint of the same data, architecture and "
                            "vocabulary is resumed, any other is refused with the mismatch named")
    group.add_argument("--logging_steps", type=int, default=10)
    group.add_argument("--eval_steps", type=int, default=None,
                       help="also evaluate (and log) every N optimizer steps, besides after every epoch")
    group.add_argument("--num_workers", type=int, default=1, help="DataLoader worker processes")
    group.add_argument("--cache_dir", default=None,
                       help="where tokenized Arrow datasets are cached (default: HF_DATASETS_CACHE/scbert)")
    group.add_argument("--min_overlap", type=float, default=None,
                       help="refuse data whose genes cover less than this share of the vocabulary (default: the "
                            "tokenizer's, 0.5)")
    group.add_argument("--no_progress_bar", action="store_true")
    group.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    group.add_argument("--ema_decay", type=float, default=0.0,
                       help="keep an exponential moving average of the weights with this decay per optimizer step "
                            "(e.g. 0.995; 0 = off): per-epoch evaluation, the best model and the final model use the "
                            "average, which does not swing with the last few batches as the trained weights do")
    group.add_argument("--gene_embedding_init", choices=["svd", "svd_whitened", "svd_scaled", "random"], default="svd",
                       help="from scratch: gene vectors (scBERT 2.0's gene table, scBERT v1's frozen stand-in for gene2vec) "
                            "from a truncated SVD of the training cells "
                            "(svd: components weighted by their singular values; svd_whitened: every component "
                            "at the same scale, so the small ones, e.g. rare cell types' programmes, are not "
                            "drowned out; svd_scaled: every gene at the same scale first, as PCA scales genes, so "
                            "that a few highly expressed genes' vectors cannot dwarf the rest)")
    group.add_argument("--gene_embedding_std", type=float, default=0.5)
    group.add_argument("--highly_variable_genes", type=int, default=0,
                       help="scBERT 2.0: draw each cell's tokens from this many highly variable genes of the training "
                            "cells (0: the most expressed of all genes); saved with the tokenizer, so inference with "
                            "the saved folder selects the same genes")
    return parser


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
# Config entries that may change between a run and its resumption without changing what is trained.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "architectures", "auto_map", "dtype", "torch_dtype",
                         "attn_implementation", "output_router_logits"}


def run_identity(data_fingerprint: str, model: torch.nn.Module, vocabulary: dict[str, int]) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it: the training cells, the architecture (the config
    without bookkeeping entries) and the vocabulary."""
    config = {k: v for k, v in model.config.to_diff_dict().items()
              if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(vocabulary, sort_keys=True).encode()).hexdigest()[:16]
    return {"data": data_fingerprint, "architecture": config, "vocabulary": digest}


def identity_mismatch(saved: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """A sentence naming what differs between a checkpoint's run and this one, or None when they match."""
    if saved is None:
        return "it records no run identity (saved by an older version), so it cannot be checked against this run"
    problems = []
    if saved.get("data") != current["data"]:
        problems.append("other training data (another file, a changed file, other cells or other tokenizer settings)")
    if saved.get("vocabulary") != current["vocabulary"]:
        problems.append("another gene vocabulary")
    old, new = saved.get("architecture", {}), current["architecture"]
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        problems.append("another architecture (" + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
                                                         for k in changed[:5]) + ")")
    return "it was saved by a run with " + "; ".join(problems) if problems else None


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (a folder still named *.partial was interrupted and is ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


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


class Checkpoints:
    """Saves and resumes the run's `save_state` folders (plus the weight average and the loop's counters)."""

    def __init__(self, accelerator: Accelerator, args: argparse.Namespace, identity: dict[str, Any] | None):
        self.accelerator = accelerator
        self.output_dir = args.output_dir
        self.total_limit = args.checkpoints_total_limit
        self.identity = identity

    def save(self, state: dict, ema: torch.nn.Module | None) -> Path:
        accelerator = self.accelerator
        root = Path(self.output_dir) / "checkpoints"
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
            (partial / STATE_FILE).write_text(json.dumps({**state, "run": self.identity}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in checkpoint_dirs(self.output_dir)[:-self.total_limit]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def resume(self, resume_from: str | None, ema: torch.nn.Module | None) -> dict | None:
        """The loop counters of the checkpoint named by ``resume_from`` after loading its state, or None."""
        checkpoint = resolve_checkpoint(self.output_dir, resume_from)
        if checkpoint is None:
            return None
        state = json.loads((checkpoint / STATE_FILE).read_text())
        if self.identity is not None and (mismatch := identity_mismatch(state.get("run"), self.identity)):
            raise ValueError(f"Refusing to resume from {checkpoint}: {mismatch}. Start this run in another "
                             "--output_dir, or delete that folder's checkpoints/ to start over.")
        self.accelerator.load_state(str(checkpoint))
        if ema is not None:
            if not (checkpoint / EMA_FILE).exists():
                raise FileNotFoundError(f"{checkpoint} has no {EMA_FILE}: it was saved by a run without --ema_decay; "
                                        "resume it without --ema_decay or start a new run.")
            ema.load_state_dict(load_file(checkpoint / EMA_FILE, device=str(self.accelerator.device)))
        self.accelerator.print(f"Resumed from {checkpoint} at step {state['step']} (epoch {state['epoch']}, "
                               f"batch {state['batches_done']}).")
        return state


# ---------------------------------------------------------------------------------------------------- early stopping
@dataclass
class EarlyStopping:
    """Tracks a validation metric: calls ``on_new_best`` on every improvement and says when to stop (after
    ``patience`` evaluations without one). Ties are no improvement."""

    metric: str
    greater_is_better: bool = True
    patience: int | None = None
    on_new_best: Callable[[torch.nn.Module], None] | None = None
    best: float | None = None
    best_epoch: int | None = None
    stale: int = 0

    def update(self, metrics: dict[str, float], model: torch.nn.Module, epoch: int) -> bool:
        """Records this epoch's evaluation; True when training should stop."""
        value = metrics[self.metric]
        if self.best is None or (value > self.best if self.greater_is_better else value < self.best):
            self.best, self.best_epoch, self.stale = value, epoch, 0
            if self.on_new_best is not None:
                self.on_new_best(model)
        else:
            self.stale += 1
        return self.patience is not None and self.stale >= self.patience


# ---------------------------------------------------------------------------------------------------- the loop
@dataclass
class LoopResult:
    step: int
    epoch: int
    best_metric: float | None
    best_epoch: int | None
    stopped_early: bool
    seconds: float


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace,
                    learning_rate_scales: dict[str, float] | None = None) -> torch.optim.Optimizer:
    """AdamW (or Adafactor) with weight decay on the weight matrices only. ``learning_rate_scales`` maps parameter
    names to a multiple of ``--learning_rate`` (its warm-up and decay follow the same schedule); the others train at
    ``--learning_rate``."""
    scales = learning_rate_scales or {}
    grouped: dict[tuple[float, bool], list[torch.nn.Parameter]] = {(1.0, True): [], (1.0, False): []}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            decays = not (parameter.ndim < 2 or "norm" in name.lower())
            grouped.setdefault((scales.get(name, 1.0), decays), []).append(parameter)
    groups = [{"params": parameters, "weight_decay": args.weight_decay if decays else 0.0,
               "lr": args.learning_rate * scale}
              for (scale, decays), parameters in grouped.items() if parameters or scale == 1.0]
    if args.optim == "adafactor":
        return Adafactor(groups, lr=args.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW(groups, lr=args.learning_rate)


def exponential_moving_average(model: torch.nn.Module, decay: float) -> torch.nn.Module:
    """torch's AveragedModel keeping an EMA of ``model``'s parameters and buffers (``.module`` is the averaged model)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    if not 0.0 < decay < 1.0:
        raise ValueError(f"--ema_decay must be in (0, 1) (or 0 for no averaging), got {decay}.")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def model_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """The default ``compute_loss``: the model's own loss, computed from the labels in the batch."""
    outputs = model(**batch)
    return outputs.loss, outputs


def train_loop(
    accelerator: Accelerator,
    model: torch.nn.Module,
    train_loader: DataLoader,
    args: argparse.Namespace,
    compute_loss: Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, Any]] = model_loss,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    early_stopping: EarlyStopping | None = None,
    identity: dict[str, Any] | None = None,
    learning_rate_scales: dict[str, float] | None = None,
) -> LoopResult:
    """Trains ``model`` on ``train_loader`` (a `make_loader` loader) with Accelerate; evaluates once per epoch when
    ``evaluate`` is given, and feeds that to ``early_stopping``. With ``args.ema_decay`` the weight average is what gets
    evaluated and passed to ``early_stopping.on_new_best``, and it is copied into ``model`` at the end. ``identity``
    (see `run_identity`) is stored in every checkpoint, and a checkpoint of another run is not resumed.
    ``learning_rate_scales``: see `build_optimizer`."""
    start = time.perf_counter()
    collate_fn = train_loader.collate_fn
    optimizer = build_optimizer(model, args, learning_rate_scales)
    updates_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_steps = args.max_steps or args.num_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)
    # Accelerate's prepared scheduler steps num_processes times per optimizer step (as for a batch num_processes
    # times larger), so the schedule is laid out in those units.
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(args.warmup_ratio * max_steps) * accelerator.num_processes,
                                                max_steps * accelerator.num_processes)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    ema = exponential_moving_average(accelerator.unwrap_model(model), args.ema_decay) if args.ema_decay else None
    checkpoints = Checkpoints(accelerator, args, identity)
    state = checkpoints.resume(args.resume_from_checkpoint, ema) or {"step": 0, "epoch": 0, "batches_done": 0}
    step, first_epoch = state["step"], state["epoch"]
    if early_stopping is not None:
        early_stopping.best, early_stopping.stale = state.get("best_metric"), state.get("stale_epochs", 0)
        early_stopping.best_epoch = state.get("best_epoch")
    progress = _progress_bar(accelerator, args, max_steps, step)

    stopped_early, epoch = False, first_epoch
    # A checkpoint of a finished run (e.g. the last one, resumed again with `latest`) trains no further.
    for epoch in range(first_epoch, num_epochs if step < max_steps else first_epoch):
        model.train()
        train_loader.set_epoch(epoch)
        if hasattr(collate_fn, "set_epoch"):
            collate_fn.set_epoch(epoch)
        skip = state["batches_done"] if epoch == first_epoch else 0
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        window_start, window_cells, window_tokens, batch_index = time.perf_counter(), 0, 0, skip
        for batch in loader:
            batch_index += 1
            with accelerator.accumulate(model):
                loss, outputs = compute_loss(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            window_cells += cells_in_batch(batch) * accelerator.num_processes
            window_tokens += tokens_in_batch(batch) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            if ema is not None:
                ema.update_parameters(accelerator.unwrap_model(model))
            if progress is not None:
                progress.update(1)
            if step % args.logging_steps == 0 or step == max_steps:
                seconds = max(time.perf_counter() - window_start, 1e-9)
                accelerator.log({**_loss_parts(outputs), "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                                 "epoch": epoch, "cells_per_second": window_cells / seconds,
                                 "tokens_per_second": window_tokens / seconds}, step=step)
                if progress is not None:
                    progress.set_postfix(loss=f"{loss.item():.4f}", cells_s=f"{window_cells / seconds:.0f}",
                                         tokens_s=f"{window_tokens / seconds:.0f}")
                window_start, window_cells, window_tokens = time.perf_counter(), 0, 0
            if evaluate is not None and args.eval_steps and step % args.eval_steps == 0:
                _log_evaluation(accelerator, model, ema, evaluate, step)
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                checkpoints.save({"step": step, "epoch": epoch, "batches_done": batch_index,
                                  "best_metric": early_stopping.best if early_stopping else None,
                                  "best_epoch": early_stopping.best_epoch if early_stopping else None,
                                  "stale_epochs": early_stopping.stale if early_stopping else 0}, ema)
            if step >= max_steps:
                break
        if evaluate is not None and _evaluate_epoch(accelerator, model, ema, evaluate, early_stopping, epoch, step):
            stopped_early = True
            break
        if step >= max_steps:
            break
    if progress is not None:
        progress.close()
    if ema is not None:
        accelerator.unwrap_model(model).load_state_dict(ema.module.state_dict())
    return LoopResult(step=step, epoch=epoch, best_metric=early_stopping.best if early_stopping else None,
                      best_epoch=early_stopping.best_epoch if early_stopping else None, stopped_early=stopped_early,
                      seconds=time.perf_counter() - start)


def _progress_bar(accelerator: Accelerator, args: argparse.Namespace, total: int, initial: int):
    if not accelerator.is_local_main_process or args.no_progress_bar:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _log_evaluation(accelerator: Accelerator, model, ema, evaluate: Callable, step: int, label: str = "") -> dict:
    """Evaluates the weight average (if kept) or the model, logs the metrics and prints them."""
    metrics = evaluate(model if ema is None else ema.module)
    model.train()
    accelerator.log({f"eval_{k}": v for k, v in metrics.items()}, step=step)
    accelerator.print(f"{label or f'step {step}'}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics


def _evaluate_epoch(accelerator: Accelerator, model, ema, evaluate: Callable, early_stopping: EarlyStopping | None,
                    epoch: int, step: int) -> bool:
    """Evaluates (the weight average, if kept) after an epoch and logs it; True when early stopping says stop."""
    evaluated = accelerator.unwrap_model(model) if ema is None else ema.module
    metrics = _log_evaluation(accelerator, model, ema, evaluate, step, f"epoch {epoch}")
    if early_stopping is None or not early_stopping.update(metrics, evaluated, epoch):
        return False
    accelerator.print(f"Early stopping: no {early_stopping.metric} improvement in {early_stopping.patience} epochs.")
    return True


def _loss_parts(outputs) -> dict[str, float]:
    parts = {}
    for name in ("loss", "bin_loss", "value_loss", "aux_loss", "soft_loss", "hidden_loss", "label_loss"):
        value = getattr(outputs, name, None)
        if value is not None:
            parts[name] = float(value.detach().float().item())
    return parts

"""The training scripts on small real data: pretraining, masking, crash-safe resume, two-process DDP, fine-tuning.

In-process runs call the scripts' `main` (Accelerate's state is a process-wide singleton, so it is reset around every
test); the crash test and DDP run real subprocesses. Everything uses a 150-cell x 300-gene slice of Baron et al.
(the most often expressed genes) so the whole file takes about a minute or two on two CPU cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

import modeling_scbert
from tokenization import GeneExpressionTokenizer
from train import finetune, pretrain
from train.data import ClassificationCollator, LengthGroupedSampler, MaskedExpressionCollator, pack_padded_batch
from train.loop import EMA_FILE, STATE_FILE, build_optimizer, checkpoint_dirs, resolve_checkpoint
from train.metrics import balanced_log_loss, classification_metrics
from train.novelty import DEFAULT_SCORE

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "train" / "accelerate_configs"
N_CELLS, N_GENES = 150, 300
FINETUNE_CLASSES = ("alpha", "delta", "ductal")
CELLS_PER_CLASS = 30


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs share two loaded cores with other work: one intra-op thread, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _top_genes(adata, n_genes: int) -> np.ndarray:
    import scipy.sparse as sp

    detected = np.asarray((sp.csr_matrix(adata.X) > 0).sum(axis=0)).ravel()
    return np.sort(np.argsort(-detected, kind="stable")[:n_genes])


@pytest.fixture(scope="module")
def data_dir(baron, tmp_path_factory):
    """Small real .h5ad files: `pretrain.h5ad` (150 random cells) and `finetune.h5ad` (30 cells of 3 types)."""
    folder = tmp_path_factory.mktemp("baron_subsets")
    genes = _top_genes(baron, N_GENES)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(baron.n_obs, size=N_CELLS, replace=False))
    cells = baron[rows][:, genes].copy()
    assert np.all(np.asarray(cells.X.sum(axis=1)).ravel() > 0)
    cells.write_h5ad(folder / "pretrain.h5ad")

    labels = baron.obs["cell_type1"].astype(str).to_numpy()
    picked = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == name), CELLS_PER_CLASS, replace=False)
                                     for name in FINETUNE_CLASSES]))
    labelled = baron[picked][:, genes].copy()
    labelled.obs["cell_type1"] = labelled.obs["cell_type1"].astype(str)
    assert np.all(np.asarray(labelled.X.sum(axis=1)).ravel() > 0)
    labelled.write_h5ad(folder / "finetune.h5ad")
    return folder


@pytest.fixture(scope="module")
def pretrain_data(data_dir) -> Path:
    return data_dir / "pretrain.h5ad"


@pytest.fixture(scope="module")
def finetune_data(data_dir) -> Path:
    return data_dir / "finetune.h5ad"


@pytest.fixture(scope="module")
def cells(pretrain_data):
    import anndata as ad

    return ad.read_h5ad(pretrain_data)


def pretrain_args(data: Path, output: Path, architecture: str = "scbert2-tiny", *extra: str) -> list[str]:
    return ["--data", str(data), "--architecture", architecture, "--max_length", "64", "--per_device_batch_size", "16",
            "--output_dir", str(output), "--cache_dir", str(output.parent / "cache"), "--no_progress_bar",
            "--num_workers", "0", *extra]


def log_records(output: Path, name: str = "pretrain") -> list[dict]:
    lines = (output / "logs" / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def step_records(output: Path, name: str = "pretrain") -> list[dict]:
    return [r for r in log_records(output, name) if "step" in r and "loss" in r]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), (name, (a[name] - b[name]).abs().max().item())


def rows_with_index(dataset, indices) -> list[dict]:
    return [{**dataset[int(i)], "index": int(i)} for i in indices]


# ------------------------------------------------------------------------------------------------- 1. pretraining
def test_pretrain_scbert2_end_to_end_and_the_folder_loads(pretrain_data, tmp_path):
    output = tmp_path / "run"
    folder = pretrain.main(pretrain_args(pretrain_data, output, "scbert2-tiny", "--max_steps", "4",
                                         "--logging_steps", "2", "--highly_variable_genes", "40"))
    assert folder == output / "model"
    model = AutoModelForMaskedLM.from_pretrained(folder)
    assert type(model).__name__ == "ScBert2ForMaskedRegression"
    tokenizer = GeneExpressionTokenizer.from_pretrained(folder)
    assert tokenizer.mode == "scbert2" and tokenizer.num_genes == N_GENES and tokenizer.max_length == 64
    assert 40 <= len(tokenizer.selected_genes) <= 80
    assert model.config.vocab_size == tokenizer.vocab_size
    auto = AutoTokenizer.from_pretrained(folder)
    assert type(auto) is GeneExpressionTokenizer and auto.genes == tokenizer.genes

    records = step_records(output)
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        assert {"loss", "bin_loss", "value_loss", "lr", "epoch", "cells_per_second"} <= record.keys()
        assert np.isfinite(record["loss"]) and record["cells_per_second"] > 0
    assert "aux_loss" not in records[-1]  # dense model
    assert records[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine schedule ends at max_steps
    assert log_records(output)[0]["config"]["architecture"] == "scbert2-tiny"
    summary = json.loads((output / "pretrain_summary.json").read_text())
    assert summary["steps"] == 4 and summary["cells"] == N_CELLS

    # The saved model and tokenizer work together on real cells.
    import anndata as ad

    batch = tokenizer(ad.read_h5ad(pretrain_data)[:4], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    assert out.bin_logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.value_predictions).all()


def test_pretrain_scbert_v1_mlm(pretrain_data, tmp_path):
    output = tmp_path / "run"
    folder = pretrain.main(pretrain_args(pretrain_data, output, "scbert-small", "--max_steps", "2",
                                         "--logging_steps", "1"))
    model = AutoModelForMaskedLM.from_pretrained(folder)
    assert type(model).__name__ == "ScBertForMaskedLM"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.mode == "scbert"
    assert model.config.num_tokens == tokenizer.num_bins + 2 and model.config.max_seq_len == N_GENES + 1
    records = step_records(output)
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["cells_per_second"] > 0 for r in records)


def test_pretrain_moe_logs_the_load_balancing_loss(pretrain_data, tmp_path):
    output = tmp_path / "run"
    pretrain.main(pretrain_args(pretrain_data, output, "scbert2-moe", "--max_steps", "2", "--logging_steps", "1",
                                "--max_length", "32"))
    assert AutoConfig.from_pretrained(output / "model").num_local_experts > 1
    records = step_records(output)
    assert all({"bin_loss", "value_loss", "aux_loss", "cells_per_second"} <= r.keys() for r in records)
    assert all(r["aux_loss"] > 0 for r in records)


def test_masking_does_not_depend_on_dataloader_workers(pretrain_data, tmp_path):
    """Masks are seeded per batch from (seed, epoch, cell rows), so 0 and 1 worker processes train identically."""
    runs = {}
    for workers in ("0", "1"):
        output = tmp_path / f"workers{workers}"
        args = pretrain_args(pretrain_data, output, "scbert2-tiny", "--max_steps", "3")
        args[args.index("--num_workers") + 1] = workers
        runs[workers] = weights(pretrain.main(args))
    assert_same_weights(runs["0"], runs["1"], atol=0)


# ------------------------------------------------------------------------------------------------- 2. masking
@pytest.fixture(scope="module")
def scbert2_tokenizer(cells):
    # No truncation, so cells keep their sampled zeros and differ in length (padding).
    return GeneExpressionTokenizer.from_adata(cells, mode="scbert2", max_length=None)


@pytest.fixture(scope="module")
def scbert2_dataset(scbert2_tokenizer, cells):
    return scbert2_tokenizer.to_dataset(cells)


def collate_all(collator, dataset, batch_size: int = 16) -> list[dict]:
    return [collator(rows_with_index(dataset, range(start, min(start + batch_size, len(dataset)))))
            for start in range(0, len(dataset), batch_size)]


def test_scbert2_masking_hides_only_real_gene_values(scbert2_tokenizer, scbert2_dataset):
    collator = MaskedExpressionCollator(scbert2_tokenizer, mask_probability=0.15, seed=3, zero_fraction=0.1)
    masked_total = candidate_total = masked_zeros = padding = 0
    for batch in collate_all(collator, scbert2_dataset):
        mask, real = batch["value_mask"], batch["attention_mask"].bool()
        genes = real & (batch["input_ids"] >= scbert2_tokenizer.num_special_tokens)
        assert mask.dtype == torch.bool and not (mask & ~genes).any()  # never CLS, never padding
        assert (batch["input_ids"][:, 0] == scbert2_tokenizer.cls_token_id).all() and not mask[:, 0].any()
        assert ((batch["labels"] != -100) == mask).all()
        original_bins = torch.as_tensor(scbert2_tokenizer.bin_values(batch["value_labels"].numpy()))
        assert (batch["labels"][mask] == original_bins[mask]).all()
        assert (batch["values"][mask] == 0).all() and (batch["bin_ids"][mask] == 0).all()
        assert (batch["values"][~mask] == batch["value_labels"][~mask]).all()
        assert (batch["bin_ids"][genes & ~mask] == original_bins[genes & ~mask]).all()
        masked_total += int(mask.sum())
        candidate_total += int(genes.sum())
        masked_zeros += int((mask & genes & (batch["value_labels"] == 0)).sum())
        padding += int((~real).sum())
    assert candidate_total > 5000 and padding > 0
    assert masked_total / candidate_total == pytest.approx(0.15, abs=0.02)
    assert masked_zeros > 0  # sampled unexpressed genes are real gene tokens and get masked too


def test_scbert2_value_labels_are_the_unmasked_values(cells):
    tokenizer = GeneExpressionTokenizer.from_adata(cells, mode="scbert2", max_length=64)  # no sampled zeros
    dataset = tokenizer.to_dataset(cells)
    rows = rows_with_index(dataset, range(16))
    reference = tokenizer.collate(rows, return_tensors="pt")
    batch = MaskedExpressionCollator(tokenizer, seed=0)(rows)
    assert torch.equal(batch["value_labels"], reference["values"])
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["attention_mask"], reference["attention_mask"])


@pytest.mark.parametrize("probability", [0.15, 0.4])
def test_mask_share_follows_mask_probability(scbert2_tokenizer, scbert2_dataset, probability):
    collator = MaskedExpressionCollator(scbert2_tokenizer, mask_probability=probability, seed=1)
    batches = collate_all(collator, scbert2_dataset)
    masked = sum(int(b["value_mask"].sum()) for b in batches)
    candidates = sum(int((b["attention_mask"].bool() & (b["input_ids"] >= 3)).sum()) for b in batches)
    assert masked / candidates == pytest.approx(probability, abs=0.02)


def test_scbert_v1_masks_nonzero_bins_with_the_mask_token(cells):
    tokenizer = GeneExpressionTokenizer.from_adata(cells, mode="scbert")
    dataset = tokenizer.to_dataset(cells)
    collator = MaskedExpressionCollator(tokenizer, seed=2)
    mask_token = tokenizer.num_bins + 1
    chosen_total = nonzero_total = replaced_total = 0
    for start in range(0, len(dataset), 16):
        rows = rows_with_index(dataset, range(start, min(start + 16, len(dataset))))
        original = tokenizer.collate(rows, return_tensors="pt")["input_ids"]
        batch = collator(rows)
        assert batch["input_ids"].shape == (len(rows), N_GENES + 1)
        chosen = batch["labels"] != -100
        assert (original[chosen] > 0).all()  # only expressed genes
        assert not chosen[:, -1].any() and (batch["input_ids"][:, -1] == 0).all()  # the trailing token
        assert (batch["labels"][chosen] == original[chosen]).all()
        replaced = batch["input_ids"] == mask_token
        assert not (replaced & ~chosen).any()
        assert (batch["input_ids"][~replaced] == original[~replaced]).all()
        assert "value_mask" not in batch
        chosen_total += int(chosen.sum())
        nonzero_total += int((original > 0).sum())
        replaced_total += int(replaced.sum())
    assert chosen_total / nonzero_total == pytest.approx(0.15, abs=0.02)
    assert replaced_total / chosen_total == pytest.approx(0.9, abs=0.03)


def test_masks_are_a_function_of_seed_epoch_and_cells(scbert2_tokenizer, scbert2_dataset):
    rows = rows_with_index(scbert2_dataset, [5, 17, 42, 99])
    collator = MaskedExpressionCollator(scbert2_tokenizer, seed=0, zero_fraction=0.1)
    first, again = collator(rows), collator(rows)
    for key in first:
        assert torch.equal(first[key], again[key]), key
    collator.set_epoch(1)
    assert not torch.equal(collator(rows)["value_mask"], first["value_mask"])
    other_seed = MaskedExpressionCollator(scbert2_tokenizer, seed=1, zero_fraction=0.1)(rows)
    assert not torch.equal(other_seed["input_ids"], first["input_ids"])  # other sampled zeros
    assert not torch.equal(other_seed["value_mask"], first["value_mask"])
    # Without row numbers (a collator used on its own) torch's global generator decides.
    plain = [{"gene_ids": r["gene_ids"], "values": r["values"]} for r in rows]
    torch.manual_seed(0)
    a = collator(plain)["value_mask"]
    torch.manual_seed(0)
    assert torch.equal(collator(plain)["value_mask"], a)


def test_a_batch_always_has_a_masked_token(scbert2_tokenizer, scbert2_dataset):
    collator = MaskedExpressionCollator(scbert2_tokenizer, mask_probability=1e-9)
    batch = collator(rows_with_index(scbert2_dataset, range(4)))
    assert int(batch["value_mask"].sum()) == 1 and int((batch["labels"] != -100).sum()) == 1
    with pytest.raises(ValueError, match=r"mask_probability must be in \(0, 1\)"):
        MaskedExpressionCollator(scbert2_tokenizer, mask_probability=1.0)


def test_gene_dropout_drops_the_requested_share_reproducibly(cells):
    tokenizer = GeneExpressionTokenizer.from_adata(cells, mode="scbert2", max_length=None)
    dataset = tokenizer.to_dataset(cells)
    rows = rows_with_index(dataset, range(32))
    full = ClassificationCollator(tokenizer)(rows)
    collator = ClassificationCollator(tokenizer, gene_dropout=0.3, seed=0)
    dropped, again = collator(rows), collator(rows)
    for key in dropped:
        assert torch.equal(dropped[key], again[key]), key
    kept = int(dropped["attention_mask"][:, 1:].sum()) / int(full["attention_mask"][:, 1:].sum())
    assert kept == pytest.approx(0.7, abs=0.03)
    # Each cell keeps a subset of its own genes with their own values.
    for row in range(len(rows)):
        genes = dict(zip(full["input_ids"][row].tolist(), full["values"][row].tolist()))
        for gene, value in zip(dropped["input_ids"][row].tolist(), dropped["values"][row].tolist()):
            if gene >= tokenizer.num_special_tokens:
                assert genes[gene] == value
    collator.set_epoch(1)
    assert not torch.equal(collator(rows)["attention_mask"], dropped["attention_mask"])
    # Even at a dropout near 1 every cell keeps a gene.
    almost_all = ClassificationCollator(tokenizer, gene_dropout=0.999, seed=0)(rows)
    assert torch.all(almost_all["attention_mask"][:, 1:].sum(dim=1) >= 1)
    with pytest.raises(ValueError, match=r"gene_dropout must be in \[0, 1\)"):
        ClassificationCollator(tokenizer, gene_dropout=1.0)


def test_class_balanced_sampling_draws_every_class_equally_and_reproducibly():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [300, 30, 3])
    lengths = rng.integers(50, 500, size=len(labels))
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=0, weights=1.0 / np.bincount(labels)[labels])
    first = list(sampler)
    assert len(first) == len(labels) and first == list(sampler)
    counts = np.bincount(labels[first], minlength=3)
    assert np.all(np.abs(counts / len(labels) - 1 / 3) < 0.06), counts  # 3 cells drawn about 111 times
    sampler.set_epoch(1)
    assert list(sampler) != first
    # Batches still group cells of similar length: far less spread within a batch than in a random batch.
    batches = [lengths[first[i:i + 16]] for i in range(0, len(first) - 15, 16)]
    assert np.median([b.max() - b.min() for b in batches]) < 0.5 * (lengths.max() - lengths.min())
    for bad in (np.ones(3), -np.ones(len(labels)), np.zeros(len(labels))):
        with pytest.raises(ValueError, match="Sampling weights must be"):
            LengthGroupedSampler(lengths, 16, 0, weights=bad)


# ------------------------------------------------------------------------------------------------- 3. resume
def test_resolve_checkpoint_ignores_partial_and_sorts_numerically(tmp_path):
    assert resolve_checkpoint(str(tmp_path), "latest") is None
    assert resolve_checkpoint(str(tmp_path), None) is None
    root = tmp_path / "checkpoints"
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-999.partial", "checkpoint-x", "other"):
        (root / name).mkdir(parents=True)
        (root / name / STATE_FILE).write_text("{}")
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert resolve_checkpoint(str(tmp_path), "latest") == root / "checkpoint-10"
    assert resolve_checkpoint(str(tmp_path), str(root / "checkpoint-2")) == root / "checkpoint-2"
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint(str(tmp_path), str(tmp_path / "half"))


def _load_checkpoint_in_fresh_objects(checkpoint: Path, model_folder: Path) -> tuple[dict, object, object]:
    """accelerator.load_state into a newly built model/optimizer/scheduler, as a resumed run does."""
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(123)
    model = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(model_folder))
    optimizer = build_optimizer(model, argparse.Namespace(weight_decay=0.01, optim="adamw", learning_rate=1e-3))
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, 10)
    accelerator = Accelerator()
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.load_state(str(checkpoint))
    state = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    return state, optimizer, scheduler


def test_killed_pretraining_resumes_to_the_same_weights(pretrain_data, tmp_path):
    max_steps, every = 56, 2  # 10 batches per epoch: the run ends mid-epoch

    def command(output: Path) -> list[str]:
        args = pretrain_args(pretrain_data, output, "scbert2-tiny", "--max_steps", str(max_steps),
                             "--checkpointing_steps", str(every), "--logging_steps", "5")
        args[args.index("--num_workers") + 1] = "1"  # the default: masks are built in a worker process
        args[args.index("--cache_dir") + 1] = str(output / "cache")  # concurrent runs: separate caches
        return [sys.executable, "-m", "train.pretrain", *args]

    reference_dir, crashed_dir = tmp_path / "uninterrupted", tmp_path / "crashed"
    env = subprocess_env()
    with open(tmp_path / "reference.log", "w") as ref_log, open(tmp_path / "crashed.log", "w") as crash_log:
        reference = subprocess.Popen(command(reference_dir), cwd=ROOT, env=env, stdout=ref_log, stderr=subprocess.STDOUT)
        crashed = subprocess.Popen(command(crashed_dir), cwd=ROOT, env=env, stdout=crash_log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not checkpoint_dirs(crashed_dir):
                assert crashed.poll() is None, "the run ended before its first checkpoint:\n" + (
                    tmp_path / "crashed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 240 s"
                time.sleep(0.02)
            still_running = crashed.poll() is None
            os.killpg(crashed.pid, signal.SIGKILL)  # the run and its DataLoader worker
        finally:
            if crashed.poll() is None:
                os.killpg(crashed.pid, signal.SIGKILL)
            crashed.wait()
        assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    assert still_running, "pretraining finished before it could be killed"
    assert crashed.returncode == -signal.SIGKILL
    assert not (crashed_dir / "model").exists()
    killed_at = int(checkpoint_dirs(crashed_dir)[-1].name.split("-")[1])
    assert killed_at < max_steps

    resumed = subprocess.run(command(crashed_dir) + ["--resume_from_checkpoint", "latest"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout and "checkpoint-" in resumed.stdout

    # Step counts: the last checkpoint's training_state.json, the JSONL log and the summary all end at max_steps.
    checkpoints = checkpoint_dirs(crashed_dir)
    assert checkpoints[-1].name == f"checkpoint-{max_steps}" and len(checkpoints) == 2  # checkpoints_total_limit
    assert not list((crashed_dir / "checkpoints").glob("*.partial"))
    for checkpoint in checkpoints:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        assert state["step"] == int(checkpoint.name.split("-")[1])
    assert json.loads((checkpoints[-1] / STATE_FILE).read_text())["step"] == max_steps
    records = step_records(crashed_dir)
    assert records[-1]["step"] == max_steps and max(r["step"] for r in records) == max_steps
    assert json.loads((crashed_dir / "pretrain_summary.json").read_text())["steps"] == max_steps

    # Every checkpoint folder loads into fresh objects and holds the weights of its model.safetensors.
    for checkpoint in checkpoints:
        state, optimizer, scheduler = _load_checkpoint_in_fresh_objects(checkpoint, crashed_dir / "model")
        saved = weights(checkpoint)
        assert saved.keys() == state.keys()
        assert_same_weights(saved, state, atol=0)
        step = int(checkpoint.name.split("-")[1])
        assert scheduler.state_dict()["last_epoch"] == step
        assert all(s["step"] == step for s in optimizer.optimizer.state_dict()["state"].values())
    assert_same_weights(weights(checkpoints[-1]), weights(crashed_dir / "model"), atol=0)

    # A resumed run reproduces the uninterrupted one (same seed, masks seeded per batch).
    assert_same_weights(weights(crashed_dir / "model"), weights(reference_dir / "model"), atol=1e-5)

    # An interrupted save (a folder still named *.partial) is never taken as the latest checkpoint.
    fake = crashed_dir / "checkpoints" / "checkpoint-999.partial"
    fake.mkdir()
    (fake / STATE_FILE).write_text(json.dumps({"step": 999, "epoch": 0, "batches_done": 0}))
    assert resolve_checkpoint(str(crashed_dir), "latest") == checkpoints[-1]

    # Resuming a finished run again trains no further.
    before = weights(crashed_dir / "model")
    args = command(crashed_dir)[3:] + ["--resume_from_checkpoint", "latest"]
    pretrain.main(args)
    assert json.loads((crashed_dir / "pretrain_summary.json").read_text())["steps"] == max_steps
    assert step_records(crashed_dir)[-1]["step"] == max_steps
    assert_same_weights(weights(crashed_dir / "model"), before, atol=0)


# ------------------------------------------------------------------------------------------------- 4. DDP
DDP_SCRIPT = '''
import argparse, json, sys
sys.path.insert(0, {root!r})
import torch
from accelerate.utils import set_seed
from transformers import AutoModelForMaskedLM
from tokenization import GeneExpressionTokenizer
from train.data import MaskedExpressionCollator, load_tokenized_dataset, make_loader, read_h5ad
from train.loop import add_training_arguments, make_accelerator, train_loop
from train.models import architecture_config


class RecordingCollator(MaskedExpressionCollator):
    seen = []

    def __call__(self, cells):
        self.seen.extend(int(cell["index"]) for cell in cells)
        return super().__call__(cells)


parser = argparse.ArgumentParser()
parser.add_argument("--data")
parser.add_argument("--result")
args = add_training_arguments(parser).parse_args()
accelerator = make_accelerator(args, "ddp")
set_seed(args.seed)
tokenizer = GeneExpressionTokenizer.from_adata(read_h5ad(args.data), mode="scbert2", max_length=64)
model = AutoModelForMaskedLM.from_config(architecture_config("scbert2-tiny", tokenizer))
with accelerator.main_process_first():
    dataset = load_tokenized_dataset([args.data], tokenizer, cache_dir=args.cache_dir)
collator = RecordingCollator(tokenizer, seed=args.seed)
loader = make_loader(dataset, collator, args.per_device_batch_size, True, args.seed, args.num_workers)
result = train_loop(accelerator, model, loader, args)
unwrapped = accelerator.unwrap_model(model)
checksum = torch.cat([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                      for p in unwrapped.parameters()])
checksums = accelerator.gather(checksum.unsqueeze(0))
seen = torch.zeros(1, len(dataset), dtype=torch.long)
seen[0, collator.seen] = 1
seen = accelerator.gather(seen)
if accelerator.is_main_process:
    json.dump({{"num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
               "backend": accelerator.state.backend, "steps": result.step, "checksums": checksums.tolist(),
               "seen": seen.tolist()}}, open(args.result, "w"))
accelerator.end_training()
'''


def test_weight_average_is_the_final_model_and_resumes_from_its_checkpoint(pretrain_data, tmp_path):
    def run(output: Path, *extra: str) -> Path:
        return pretrain.main(pretrain_args(pretrain_data, output, "scbert2-tiny", "--max_steps", "8",
                                           "--checkpointing_steps", "4", "--ema_decay", "0.8", *extra))

    full = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoints" / "checkpoint-8"
    average = {name.removeprefix("module."): t for name, t in load_file(str(checkpoint / EMA_FILE)).items()
               if name.startswith("module.")}
    trained = weights(checkpoint)  # accelerate's save_state: the weights the optimizer moved
    assert_same_weights(weights(full), average, atol=0)
    assert max((trained[n] - average[n]).abs().max().item() for n in trained) > 1e-4

    resumed = run(tmp_path / "resumed", "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoints" / "checkpoint-4"))
    assert_same_weights(weights(resumed), weights(full), atol=1e-5)

    plain = tmp_path / "plain"
    pretrain.main(pretrain_args(pretrain_data, plain, "scbert2-tiny", "--max_steps", "4", "--checkpointing_steps", "4"))
    with pytest.raises(FileNotFoundError, match="without --ema_decay"):
        run(plain, "--resume_from_checkpoint", "latest")
    with pytest.raises(ValueError, match="ema_decay must be in"):
        run(tmp_path / "bad", "--ema_decay", "1.5")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_on_cpu_keeps_ranks_identical(pretrain_data, tmp_path):
    script = tmp_path / "ddp_check.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(root=str(ROOT))))
    output, result = tmp_path / "ddp", tmp_path / "ddp.json"
    max_steps = 5
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG_DIR / "cpu_ddp_2proc.yaml"),
        "--main_process_port", str(free_port()), str(script),
        "--data", str(pretrain_data), "--result", str(result), "--output_dir", str(output),
        "--cache_dir", str(tmp_path / "cache"), "--max_steps", str(max_steps), "--per_device_batch_size", "8",
        "--logging_steps", "1", "--num_workers", "0", "--no_progress_bar",
        "--checkpointing_steps", "1", "--checkpoints_total_limit", str(max_steps),
    ]
    run = subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(result.read_text())
    assert report["num_processes"] == 2 and report["distributed_type"] == "DistributedType.MULTI_CPU"
    assert report["backend"] == "gloo" and report["steps"] == max_steps
    rank0, rank1 = np.asarray(report["checksums"])
    assert np.array_equal(rank0, rank1)  # DDP: both ranks end with the same weights
    seen = np.asarray(report["seen"])
    assert seen[0].sum() > 0 and seen[1].sum() > 0 and not (seen[0] & seen[1]).any()  # disjoint shards
    records = log_records(output, "ddp")
    assert sum("config" in r for r in records) == 1  # one main process logs
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, max_steps + 1))
    # The LR schedule spans max_steps although Accelerate steps the scheduler once per process.
    assert steps[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert steps[0]["cells_per_second"] > 0
    # Every checkpoint is complete: each rank's random state is in the folder before it is renamed.
    checkpoints = checkpoint_dirs(output)
    assert [c.name for c in checkpoints] == [f"checkpoint-{n}" for n in range(1, max_steps + 1)]
    assert not list((output / "checkpoints").glob("*.partial"))
    for checkpoint in checkpoints:
        assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", STATE_FILE} <= {
            p.name for p in checkpoint.iterdir()}


# ------------------------------------------------------------------------------------------------- 5. fine-tuning
def finetune_args(data: Path, output: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--label_key", "cell_type1", "--output_dir", str(output),
            "--cache_dir", str(output.parent / "cache"), "--max_length", "64", "--per_device_batch_size", "16",
            "--num_workers", "0", "--no_progress_bar", *extra]


def test_finetune_from_scratch_writes_results_and_labels(finetune_data, tmp_path):
    output = tmp_path / "run"
    results = finetune.main(finetune_args(finetune_data, output, "--architecture", "scbert2-tiny",
                                          "--num_epochs", "2", "--baseline_C", "0.1", "1.0",
                                          "--highly_variable_genes", "40"))
    saved = json.loads((output / "results.json").read_text())
    assert saved["num_classes"] == len(FINETUNE_CLASSES) and saved["model_type"] == "scbert2"
    n = len(FINETUNE_CLASSES) * CELLS_PER_CLASS
    assert sum(saved["split"].values()) == n
    for key in ("model", "baseline_logistic_regression_l1"):
        assert 0.0 <= saved[key]["accuracy"] <= 1.0 and 0.0 <= saved[key]["macro_f1"] <= 1.0
    assert saved["baseline_logistic_regression_l1"]["C"] in (0.1, 1.0)
    for key in ("model", "baseline_logistic_regression_l1"):
        assert set(saved[key]["per_class_f1"]) == set(FINETUNE_CLASSES)
    assert saved["model"]["steps"] > 0 and results["model"] == saved["model"]

    config = AutoConfig.from_pretrained(output / "model")
    assert config.id2label == dict(enumerate(sorted(FINETUNE_CLASSES)))
    assert config.label2id == {name: i for i, name in enumerate(sorted(FINETUNE_CLASSES))}
    model = AutoModelForSequenceClassification.from_pretrained(output / "model")
    assert model.config.num_labels == len(FINETUNE_CLASSES)
    tokenizer = GeneExpressionTokenizer.from_pretrained(output / "model")
    assert tokenizer.num_genes == N_GENES and 40 <= len(tokenizer.selected_genes) <= 80
    records = log_records(output, "finetune")
    assert any("eval_macro_f1" in r for r in records)
    # The open-set detector: thresholds for every score, the class statistics beside the weights.
    detector = config.novelty_detection
    assert detector["score"] == DEFAULT_SCORE and set(detector["thresholds"]) == {
        "max_probability", "energy", "prototype_distance", "mahalanobis", "expression_knn", "class_scaled_knn",
        "combined", "combined_max", "knn_energy", "knn_mahalanobis_energy"}
    assert detector["gate"]["score"] == "class_scaled_knn"
    assert (output / "model" / "novelty.safetensors").is_file()
    assert 0.0 <= saved["novelty_detection"]["test_flagged_share"] <= 1.0


def test_finetune_freezes_the_gene_table_and_balances_classes(finetune_data, tmp_path, monkeypatch):
    seen = {}
    real_train_loop = finetune.train_loop

    def spy(accelerator, model, train_loader, *args, compute_loss=None, **kwargs):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        weights = train_loader.sampler.weights
        seen.update(weights=None if weights is None else weights.numpy(),
                    labels=np.asarray(train_loader.dataset.dataset["label"]), compute_loss=compute_loss)
        result = real_train_loop(accelerator, model, train_loader, *args, compute_loss=compute_loss, **kwargs)
        seen["changed"] = {n for n, p in accelerator.unwrap_model(model).named_parameters()
                           if not torch.equal(p.detach(), before[n])}
        return result

    monkeypatch.setattr(finetune, "train_loop", spy)
    finetune.main(finetune_args(finetune_data, tmp_path / "run", "--architecture", "scbert2-tiny", "--max_steps", "3",
                                "--no_baseline", "--freeze_gene_embeddings"))
    assert "model.embeddings.gene_embeddings.weight" not in seen["changed"]
    assert "classifier.weight" in seen["changed"] and len(seen["changed"]) > 10
    per_class = np.bincount(seen["labels"], weights=seen["weights"])
    assert np.allclose(per_class, 1.0)  # by default each class's cells share one unit of sampling weight
    assert seen["compute_loss"] is finetune.model_loss  # ...and the loss is not weighted a second time

    results = finetune.main(finetune_args(finetune_data, tmp_path / "weighted", "--architecture", "scbert2-tiny",
                                          "--max_steps", "1", "--no_baseline", "--class_sampling", "none",
                                          "--class_weighting", "balanced", "--metric_for_best", "balanced_log_loss"))
    assert seen["weights"] is None and seen["compute_loss"] is not finetune.model_loss
    assert results["model"]["best_validation_balanced_log_loss"] > 0

    with pytest.raises(ValueError, match="freeze_gene_embeddings applies to scBERT 2.0"):
        finetune.main(finetune_args(finetune_data, tmp_path / "v1", "--architecture", "scbert-small", "--max_steps",
                                    "1", "--no_baseline", "--freeze_gene_embeddings"))
    with pytest.raises(ValueError, match="--gene_table aligned turns the SVD table onto scBERT 2.0"):
        finetune.main(finetune_args(finetune_data, tmp_path / "v1", "--architecture", "scbert-small", "--max_steps",
                                    "1", "--no_baseline", "--gene_table", "aligned"))


@pytest.mark.parametrize("flag,expected", [((), True), (("--no-expression_pooling",), False)])
def test_finetune_expression_pooling_is_on_by_default_and_saved_with_the_head(finetune_data, tmp_path, flag,
                                                                              expected):
    output = tmp_path / "run"
    finetune.main(finetune_args(finetune_data, output, "--architecture", "scbert2-tiny", "--max_steps", "2",
                                "--no_baseline", *flag))
    model = AutoModelForSequenceClassification.from_pretrained(output / "model")
    assert model.config.expression_pooling is expected and model.config.pooling == "mean_max"
    assert model.classifier.in_features == (3 if expected else 2) * model.config.hidden_size
    with pytest.raises(ValueError, match="expression_pooling reads the gene table of scBERT 2.0"):
        finetune.main(finetune_args(finetune_data, tmp_path / "v1", "--architecture", "scbert-small", "--max_steps",
                                    "1", "--no_baseline", "--expression_pooling"))


def test_finetune_twice_with_the_same_seed_gives_the_same_weights(finetune_data, tmp_path):
    """Bitwise, with two intra-op threads (where thread timing could reorder a sum): every run of a seed is the same
    run, so a change in results is a change in the code or the data. Batches of 64 cells: large enough for PyTorch
    to split the gene table's gradient sum across the threads (at 16 it stays on one, and the test could not fail)."""
    torch.set_num_threads(2)
    try:
        for run in ("a", "b"):
            finetune.main(finetune_args(finetune_data, tmp_path / run, "--architecture", "scbert2-tiny",
                                        "--max_steps", "6", "--no_baseline", "--highly_variable_genes", "40",
                                        "--per_device_batch_size", "64"))
    finally:
        torch.set_num_threads(1)
    assert_same_weights(weights(tmp_path / "a" / "model"), weights(tmp_path / "b" / "model"), atol=0)
    scores = [{key: value for key, value in json.loads((tmp_path / run / "results.json").read_text())["model"].items()
               if not key.endswith("seconds")} for run in ("a", "b")]
    assert scores[0] == scores[1] and "macro_f1" in scores[0]


def test_finetune_scbert_v1_from_scratch_keeps_the_full_panel(finetune_data, tmp_path):
    output = tmp_path / "run"
    results = finetune.main(finetune_args(finetune_data, output, "--architecture", "scbert-small", "--num_epochs", "1",
                                          "--no_baseline"))
    assert results["model_type"] == "scbert" and 0.0 <= results["model"]["macro_f1"] <= 1.0
    assert GeneExpressionTokenizer.from_pretrained(output / "model").selected_genes is None
    # No cell embedding, so no embedding scores; the expression score needs none.
    detector = AutoConfig.from_pretrained(output / "model").novelty_detection
    assert detector["score"] == "knn_energy" and "mahalanobis" not in detector["thresholds"]
    assert "class_means" not in load_file(str(output / "model" / "novelty.safetensors"))


def test_finetune_from_scratch_takes_a_folders_shape_and_genes_but_not_its_weights(pretrain_data, finetune_data,
                                                                                    tmp_path, monkeypatch):
    folder = pretrain.main(pretrain_args(pretrain_data, tmp_path / "pt", "scbert-small", "--max_steps", "1"))
    pretrained = weights(folder)

    class Started(Exception):
        pass

    starts = {}

    def record_start(accelerator, model, *args, **kwargs):
        starts[len(starts)] = {n: t.detach().clone() for n, t in model.state_dict().items()}
        raise Started

    monkeypatch.setattr(finetune, "train_loop", record_start)
    for extra in ([], ["--from_scratch"]):
        with pytest.raises(Started):
            finetune.main(finetune_args(finetune_data, tmp_path / "ft", "--model", str(folder), "--no_baseline",
                                        "--gene_table", "pretrained", *extra))
    encoder = [n for n in pretrained if n.startswith("scbert.") and n in starts[0]]
    assert len(encoder) > 10
    assert all(torch.equal(starts[0][n], pretrained[n]) for n in encoder)
    assert not all(torch.equal(starts[1][n], pretrained[n]) for n in encoder)
    assert all(starts[1][n].shape == pretrained[n].shape for n in encoder)
    with pytest.raises(ValueError, match="--from_scratch takes the architecture and genes of a --model folder"):
        finetune.main(finetune_args(finetune_data, tmp_path / "ft", "--architecture", "scbert-small", "--from_scratch"))


def _split_args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{"test_size": 0.2, "validation_size": 0.1, "kfold": None, "fold": 0,
                                 "labelled_per_class": None, "seed": 0, **overrides})


def test_split_cells_is_stratified_and_disjoint():
    labels = np.repeat([0, 1, 2], [60, 30, 10])
    names = ["a", "b", "c"]
    split = finetune.split_cells(labels, names, _split_args())
    parts = [set(split[k]) for k in ("train", "validation", "test")]
    assert sum(len(p) for p in parts) == len(labels) and set().union(*parts) == set(range(len(labels)))
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert np.bincount(labels[split["test"]]).tolist() == [12, 6, 2]  # stratified: 20% of every class
    assert (np.bincount(labels[split["validation"]], minlength=3) > 0).all()

    tests = [finetune.split_cells(labels, names, _split_args(kfold=5, fold=k))["test"] for k in range(5)]
    assert sorted(np.concatenate(tests).tolist()) == list(range(len(labels)))  # the folds partition the cells
    with pytest.raises(ValueError, match=r"--fold must be in \[0, 5\)"):
        finetune.split_cells(labels, names, _split_args(kfold=5, fold=5))


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert")
    config = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    BertModel(config).save_pretrained(folder)
    return folder


def test_finetune_bad_inputs_fail_clearly(finetune_data, bert_folder, tmp_path):
    import anndata as ad

    output = tmp_path / "run"
    args = finetune_args(finetune_data, output, "--architecture", "scbert2-tiny")
    args[args.index("--label_key") + 1] = "no_such_column"
    with pytest.raises(KeyError, match="--label_key 'no_such_column' is not a column"):
        finetune.main(args)

    lonely = ad.read_h5ad(finetune_data)
    labels = lonely.obs["cell_type1"].astype(str).to_numpy()
    labels[0] = "only_one_cell"
    lonely.obs["cell_type1"] = labels
    lonely.write_h5ad(tmp_path / "lonely.h5ad")
    with pytest.raises(ValueError, match=r"fewer than 2 cells .*'only_one_cell': 1"):
        finetune.main(finetune_args(tmp_path / "lonely.h5ad", output, "--architecture", "scbert2-tiny"))

    (tmp_path / "empty.h5ad").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is empty \(0 bytes\)"):
        finetune.main(finetune_args(tmp_path / "empty.h5ad", output))
    (tmp_path / "garbage.h5ad").write_bytes(b"not an h5ad file")
    with pytest.raises(ValueError, match="Could not read .* as .h5ad"):
        finetune.main(finetune_args(tmp_path / "garbage.h5ad", output))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        finetune.main(finetune_args(tmp_path / "missing.h5ad", output))

    with pytest.raises(ValueError, match="--encoder_learning_rate_scale slows the pretrained encoder layers"):
        finetune.main(finetune_args(finetune_data, output, "--architecture", "scbert2-tiny",
                                    "--encoder_learning_rate_scale", "0.1"))
    with pytest.raises(ValueError, match="--encoder_learning_rate_scale takes a multiple of --learning_rate >= 0"):
        finetune.main(finetune_args(finetune_data, output, "--model", str(bert_folder),
                                    "--encoder_learning_rate_scale", "-1"))

    with pytest.raises(ValueError, match=r"holds a 'bert' model; expected one of \('scbert', 'scbert2'\)"):
        finetune.main(finetune_args(finetune_data, output, "--model", str(bert_folder)))
    (tmp_path / "no_config").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        finetune.main(finetune_args(finetune_data, output, "--model", str(tmp_path / "no_config")))
    bare = tmp_path / "no_tokenizer"
    config = modeling_scbert.ScBert2Config.from_preset("scbert2-tiny", vocab_size=N_GENES + 3, num_bins=5)
    AutoModelForMaskedLM.from_config(config).save_pretrained(bare)
    with pytest.raises(FileNotFoundError, match="has no tokenizer files"):
        finetune.main(finetune_args(finetune_data, output, "--model", str(bare)))


def test_pretrain_refuses_a_folder_of_another_model_type(pretrain_data, bert_folder, tmp_path):
    args = pretrain_args(pretrain_data, tmp_path / "run", "scbert2-tiny", "--max_steps", "1")
    args[args.index("--architecture"):args.index("--architecture") + 2] = ["--model", str(bert_folder)]
    with pytest.raises(ValueError, match="holds a 'bert' model"):
        pretrain.main(args)


# ------------------------------------------------------------------------------------------------- 6. optimizers, precision
def test_adafactor_runs_and_is_the_optimizer(pretrain_data, tmp_path):
    output = tmp_path / "run"
    pretrain.main(pretrain_args(pretrain_data, output, "scbert2-tiny", "--optim", "adafactor", "--max_steps", "2",
                                "--logging_steps", "1", "--checkpointing_steps", "2"))
    assert all(np.isfinite(r["loss"]) for r in step_records(output))
    optimizer_state = torch.load(checkpoint_dirs(output)[-1] / "optimizer.bin", weights_only=True)
    per_parameter = list(optimizer_state["state"].values())
    assert any("exp_avg_sq_row" in s for s in per_parameter)  # Adafactor's factored second moments
    assert not any("exp_avg" in s for s in per_parameter)  # no AdamW moments


def test_bf16_mixed_precision_on_cpu(pretrain_data, tmp_path):
    from accelerate.state import AcceleratorState

    output = tmp_path / "run"
    try:
        pretrain.main(pretrain_args(pretrain_data, output, "scbert2-tiny", "--mixed_precision", "bf16",
                                    "--max_steps", "2", "--logging_steps", "1"))
    except (ValueError, RuntimeError) as error:
        if "bf16" in str(error) or "bfloat16" in str(error).lower():
            pytest.skip(f"Accelerate refuses bf16 on this CPU: {error}")
        raise
    assert AcceleratorState().mixed_precision == "bf16"
    assert all(np.isfinite(r["loss"]) for r in step_records(output))
    assert AutoConfig.from_pretrained(output / "model").model_type == "scbert2"


def test_mixed_precision_of_the_accelerate_config_reaches_the_scripts(pretrain_data, tmp_path, monkeypatch):
    """`accelerate launch` passes the config's mixed_precision in the environment; the flag only overrides it."""
    from accelerate.state import AcceleratorState, GradientState

    from train.loop import make_accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    args = pretrain.parse_args(["--data", str(pretrain_data), "--output_dir", str(tmp_path / "a")])
    assert args.mixed_precision is None
    assert make_accelerator(args, "check").mixed_precision == "bf16"
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    args = pretrain.parse_args(["--data", str(pretrain_data), "--output_dir", str(tmp_path / "b"),
                                "--mixed_precision", "no"])
    assert make_accelerator(args, "check").mixed_precision == "no"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed precision needs a CUDA GPU (none here)")
def test_fp16_mixed_precision_on_gpu(pretrain_data, tmp_path):
    output = tmp_path / "run"
    pretrain.main(pretrain_args(pretrain_data, output, "scbert2-tiny", "--mixed_precision", "fp16",
                                "--max_steps", "2", "--logging_steps", "1"))
    assert all(np.isfinite(r["loss"]) for r in step_records(output))


# ------------------------------------------------------------------------------------------------- 7. accelerate configs
def _launch_args(config_file: Path):
    """What `accelerate launch --config_file FILE` makes of the file (its own validation included)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "train.pretrain"])
    validated = _validate_launch_command(args)
    return validated[0] if isinstance(validated, tuple) else validated


def test_accelerate_config_files():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    configs = {name: load_config_from_file(str(CONFIG_DIR / f"{name}.yaml"))
               for name in ("multi_gpu_ddp", "fsdp", "multi_node", "cpu_ddp_2proc")}
    assert all(isinstance(c, ClusterConfig) for c in configs.values())

    ddp = configs["multi_gpu_ddp"]
    assert ddp.distributed_type == DistributedType.MULTI_GPU and ddp.num_machines == 1 and ddp.num_processes > 1
    assert ddp.mixed_precision == "bf16" and not ddp.use_cpu

    fsdp = configs["fsdp"]
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.mixed_precision == "bf16"
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp.fsdp_config["fsdp_reshard_after_forward"] in (True, "FULL_SHARD")  # FSDP2 / FSDP1 full shard
    layer = fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    assert layer == "ScBert2EncoderLayer" and layer in modeling_scbert.ScBert2PreTrainedModel._no_split_modules
    assert hasattr(modeling_scbert.modeling_scbert2, layer)

    node = configs["multi_node"]
    assert node.num_machines == 2 and node.machine_rank == 0 and node.num_processes % 2 == 0
    assert node.main_process_ip == "MAIN_MACHINE_IP_OR_HOSTNAME" and node.main_process_port == 29500

    cpu = configs["cpu_ddp_2proc"]
    assert cpu.num_processes == 2 and cpu.num_machines == 1 and cpu.mixed_precision == "no"
    # MULTI_GPU so that `accelerate launch` starts 2 processes; make_accelerator then uses gloo on the CPU.
    assert cpu.distributed_type == DistributedType.MULTI_GPU

    # accelerate launch accepts every file and turns it into the intended launcher settings.
    assert _launch_args(CONFIG_DIR / "multi_gpu_ddp.yaml").multi_gpu
    fsdp_launch = _launch_args(CONFIG_DIR / "fsdp.yaml")
    assert fsdp_launch.use_fsdp and fsdp_launch.fsdp_transformer_layer_cls_to_wrap == "ScBert2EncoderLayer"
    node_launch = _launch_args(CONFIG_DIR / "multi_node.yaml")
    assert node_launch.num_machines == 2 and node_launch.main_process_ip == "MAIN_MACHINE_IP_OR_HOSTNAME"
    cpu_launch = _launch_args(CONFIG_DIR / "cpu_ddp_2proc.yaml")
    assert cpu_launch.multi_gpu and cpu_launch.num_processes == 2 and not cpu_launch.cpu
    readme = (CONFIG_DIR / "README.md").read_text()
    assert all(f"{name}.yaml" in readme for name in configs)


def test_fsdp_wrap_class_resolves_on_a_real_model():
    """The class named in fsdp.yaml is found by Accelerate's transformer auto-wrap policy on an scBERT 2.0 model."""
    import yaml
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    fsdp_config = yaml.safe_load((CONFIG_DIR / "fsdp.yaml").read_text())["fsdp_config"]
    config = modeling_scbert.ScBert2Config.from_preset("scbert2-tiny", vocab_size=50, num_bins=5)
    model = AutoModelForMaskedLM.from_config(config)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp_config["fsdp_version"], auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[fsdp_config["fsdp_transformer_layer_cls_to_wrap"]],
        reshard_after_forward=fsdp_config["fsdp_reshard_after_forward"])
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [type(module).__name__ for module in model.modules() if policy(module)]
    assert wrapped == ["ScBert2EncoderLayer"] * config.num_hidden_layers


def test_classification_metrics_name_every_class_and_each_mistake():
    labels, predictions = np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 1, 2])
    metrics = classification_metrics(labels, predictions, ["a", "b", "c", "d"])
    assert metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["per_class_f1"] == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 2 / 3, "d": 0.0})
    assert metrics["errors"] == {"a -> b": 1, "c -> b": 1}
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 2 / 3) / 3)  # over the classes present


def test_main_job_starts_from_a_pretrained_folder_and_annotates_every_cell(pretrain_data, finetune_data, tmp_path,
                                                                         capsys):
    import anndata as ad

    from train import main as main_job

    pretrained = pretrain.main(pretrain_args(pretrain_data, tmp_path / "pt", "scbert2-tiny", "--max_steps", "2"))
    output = tmp_path / "main"
    with pytest.raises(FileNotFoundError, match="is not a model folder"):
        main_job.main(["--data", str(finetune_data), "--model", str(tmp_path), "--output_dir", str(output)])
    results = main_job.main(["--data", str(finetune_data), "--model", str(pretrained), "--output_dir", str(output),
                             "--pretrain_epochs", "1", "--finetune_epochs", "1", "--highly_variable_genes", "40",
                             "--max_length", "48"])
    folder = output / "model"
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert model.config.id2label == dict(enumerate(sorted(FINETUNE_CLASSES)))
    assert json.loads((folder / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["pretrain"]["steps"] > 0 and "baseline_logistic_regression_l1" in results
    assert results["pretrained_from"] == str(output / "pretrain" / "model")  # continued pretraining, then fine-tuning
    tokenizer = GeneExpressionTokenizer.from_pretrained(folder)
    assert 40 <= len(tokenizer.selected_genes) <= 80 and tokenizer.max_length == 48
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in os.listdir(folder))  # safetensors only
    # Every input cell, in order, with its prediction, confidence, split and embedding; and the UMAP.
    annotated, original = ad.read_h5ad(output / "annotated.h5ad"), ad.read_h5ad(finetune_data)
    assert list(annotated.obs_names) == list(original.obs_names)
    assert set(annotated.obs["scbert_cell_type"]) <= set(FINETUNE_CLASSES)
    assert ((annotated.obs["scbert_confidence"] > 0) & (annotated.obs["scbert_confidence"] <= 1)).all()
    split = annotated.obs["scbert_split"].value_counts().to_dict()
    assert split == {part: results["split"][part] for part in ("train", "validation", "test")}
    # mean_max pooling and the expression read through the gene table
    assert annotated.obsm["X_scbert"].shape == (original.n_obs, 3 * model.config.hidden_size)
    assert (output / "umap.png").stat().st_size > 10_000
    assert "Hub-ready folder" in capsys.readouterr().out
    # annotate() on its own, in a fresh process that has imported nothing of the family yet.
    code = ("import sys, anndata; from train.annotate import annotate; "
            "print(list(annotate(anndata.read_h5ad(sys.argv[1]), sys.argv[2]).obs['scbert_cell_type']))")
    fresh = subprocess.run([sys.executable, "-c", code, str(finetune_data), str(folder)], cwd=ROOT,
                           capture_output=True, text=True, env=subprocess_env(), stdin=subprocess.DEVNULL)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert fresh.stdout.strip().splitlines()[-1] == str(list(annotated.obs["scbert_cell_type"]))


def test_balanced_log_loss_weighs_every_class_the_same():
    sure, unsure = np.log([0.9, 0.1]), np.log([0.6, 0.4])
    labels = np.array([0, 0, 0, 1])
    logits = np.stack([sure, sure, sure, unsure])  # three sure class-0 cells, one class-1 cell at p=0.4
    expected = (-np.log(0.9) - np.log(0.4)) / 2  # not (3 * -log 0.9 - log 0.4) / 4
    assert balanced_log_loss(labels, logits) == pytest.approx(expected)
    assert balanced_log_loss(np.array([1]), logits[3:]) == pytest.approx(-np.log(0.4))  # absent classes are skipped


@pytest.mark.parametrize("metric, scripted, kept", [
    ("balanced_log_loss", [1.0, 0.5, 0.7, 0.4, 0.6, 0.45, 0.3, 0.2], [1.0, 0.5, 0.4]),  # lower is better
    ("macro_f1", [0.2, 0.5, 0.4, 0.6, 0.55, 0.6, 0.9, 0.9], [0.2, 0.5, 0.6]),  # higher is better; a tie is no gain
])
def test_finetune_keeps_the_best_epoch_and_stops_after_patience(finetune_data, tmp_path, monkeypatch, metric, scripted,
                                                                 kept):
    values, emitted, saved = iter(scripted), [], []
    from train import metrics as metrics_module

    real_metrics, real_save = metrics_module.classification_metrics, finetune.save_model_folder

    def validation_metrics(labels, predictions, names=None):
        metrics = real_metrics(labels, predictions, names)
        if names is None and metric == "macro_f1":  # the validation pass (the test pass asks for per-class F1)
            emitted.append(next(values))
            metrics["macro_f1"] = emitted[-1]
        return metrics

    def validation_log_loss(labels, logits):
        if metric == "balanced_log_loss":
            emitted.append(next(values))
            return emitted[-1]
        return 1.0

    def save(*args, **kwargs):
        saved.append(emitted[-1])
        real_save(*args, **kwargs)

    # The validation pass (train.metrics.validation_metrics) reads these two from its own module.
    monkeypatch.setattr(metrics_module, "classification_metrics", validation_metrics)
    monkeypatch.setattr(metrics_module, "balanced_log_loss", validation_log_loss)
    monkeypatch.setattr(finetune, "save_model_folder", save)
    results = finetune.main(finetune_args(finetune_data, tmp_path / "run", "--architecture", "scbert2-tiny",
                                          "--num_epochs", "8", "--patience", "2", "--no_baseline",
                                          "--metric_for_best", metric, "--logit_adjustment", "none"))
    # Each improvement saved the model; the last save writes the kept model's novelty detector into its folder.
    assert saved[:-1] == kept and results["model"][f"best_validation_{metric}"] == kept[-1]
    assert emitted == scripted[:6]  # two epochs after the last improvement (epoch 3), training stopped


def test_logit_adjustment_is_picked_on_validation_macro_f1():
    log_prior = np.log([0.8, 0.2])
    # Balanced-trained scores: the three majority cells lean slightly to the minority class.
    logits = np.array([[0.0, 0.3], [0.0, 0.3], [0.0, 0.3], [0.0, 2.0]])
    labels = np.array([0, 0, 0, 1])
    assert finetune.choose_logit_adjustment(logits, labels, log_prior, [1.0, 0.0, 0.5]) == 0.5  # 0.5 * 1.39 > 0.3
    assert finetune.choose_logit_adjustment(logits, labels, log_prior, [0.0]) == 0.0
    easy = np.array([[2.0, 0.0], [0.0, 2.0]])
    assert finetune.choose_logit_adjustment(easy, np.array([0, 1]), log_prior, [1.0, 0.25, 0.5]) == 0.25  # ties


@pytest.mark.parametrize("architecture", ["scbert2-tiny", "scbert-small"])
def test_finetune_logit_adjustment_lives_in_the_config_and_the_head(finetune_data, tmp_path, monkeypatch, architecture):
    import anndata as ad

    def run(name: str, *extra: str) -> tuple[dict, Path]:
        output = tmp_path / name
        results = finetune.main(finetune_args(finetune_data, output, "--architecture", architecture, "--max_steps",
                                              "2", "--no_baseline", *extra))
        return results, output / "model"

    plain, plain_folder = run("plain", "--logit_adjustment", "none")
    monkeypatch.setattr(finetune, "choose_logit_adjustment", lambda *args: 1.0)
    adjusted, adjusted_folder = run("adjusted")  # the default
    assert "logit_adjustment_tau" not in plain["model"] and adjusted["model"]["logit_adjustment_tau"] == 1.0

    names = sorted(FINETUNE_CLASSES)
    labels = ad.read_h5ad(finetune_data).obs["cell_type1"].map(names.index).to_numpy()
    split = finetune.split_cells(labels, names, finetune.parse_args(finetune_args(finetune_data, tmp_path / "x")))
    train_counts = np.bincount(labels[split["train"]], minlength=len(names))
    config = AutoConfig.from_pretrained(adjusted_folder)
    assert config.logit_adjustment_tau == 1.0
    np.testing.assert_allclose(config.class_prior, train_counts / train_counts.sum())
    assert AutoConfig.from_pretrained(plain_folder).logit_adjustment_tau == 0.0

    # Both runs trained the same weights; the adjusted head adds log(prior) to the plain head's logits.
    tokenizer = GeneExpressionTokenizer.from_pretrained(adjusted_folder)
    batch = tokenizer(ad.read_h5ad(finetune_data)[:8], return_tensors="pt")
    with torch.no_grad():
        logits = {name: AutoModelForSequenceClassification.from_pretrained(folder).eval()(**batch).logits
                  for name, folder in (("plain", plain_folder), ("adjusted", adjusted_folder))}
    expected = torch.as_tensor(np.log(train_counts / train_counts.sum()), dtype=torch.float32)
    torch.testing.assert_close(logits["adjusted"] - logits["plain"], expected.expand_as(logits["plain"]))


def test_finetune_rejects_a_negative_logit_adjustment(finetune_data, tmp_path):
    with pytest.raises(ValueError, match="values >= 0"):
        finetune.main(finetune_args(finetune_data, tmp_path / "bad", "--architecture", "scbert2-tiny", "--max_steps",
                                    "1", "--no_baseline", "--logit_adjustment_grid", "-1", "0"))


# ------------------------------------------------------------------------------------------------- 7. packed batches
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("task", ["classification", "masked_regression", "moe_classification"])
def test_a_packed_and_a_padded_training_step_give_the_same_loss_and_gradients(cells, attn_implementation, task):
    from train.loop import model_loss

    tokenizer = GeneExpressionTokenizer.from_adata(cells, mode="scbert2", max_length=None)
    dataset = tokenizer.to_dataset(cells)
    rows = rows_with_index(dataset, range(24))  # cells of different lengths: the padded batch has padding
    preset = "scbert2-moe" if task == "moe_classification" else "scbert2-tiny"
    shape = {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 32, "num_hidden_layers": 2}
    config = modeling_scbert.ScBert2Config.from_preset(preset, vocab_size=tokenizer.vocab_size, classifier_dropout=0.0,
                                                       num_labels=3, pooling="mean_max", **shape)
    if task == "masked_regression":
        def collator(packed):
            return MaskedExpressionCollator(tokenizer, seed=0, zero_fraction=0.1, packed=packed)
        model_class = modeling_scbert.ScBert2ForMaskedRegression
    else:
        rows = [{**row, "label": i % 3} for i, row in enumerate(rows)]

        def collator(packed):
            return ClassificationCollator(tokenizer, gene_dropout=0.3, seed=0, packed=packed)
        model_class = modeling_scbert.ScBert2ForSequenceClassification
    torch.manual_seed(0)
    model = model_class(config).train()
    model.set_attn_implementation(attn_implementation)

    def step(packed: bool):
        model.zero_grad()
        batch = collator(packed)(rows)
        loss, _ = model_loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, batch

    padded_loss, padded_grads, padded = step(False)
    packed_loss, packed_grads, packed = step(True)
    assert "attention_mask" in padded and (padded["attention_mask"] == 0).any()
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, int(padded["attention_mask"].sum()))
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=0)
    assert len(packed_grads) > 5
    # Only the padded batch uses the padding embedding, and padding must not influence the loss: its gradient is 0.
    for name in padded_grads.keys() | packed_grads.keys():
        padded_grad = padded_grads.get(name, torch.zeros_like(dict(model.named_parameters())[name]))
        packed_grad = packed_grads.get(name, torch.zeros_like(padded_grad))
        torch.testing.assert_close(packed_grad, padded_grad, atol=1e-5, rtol=0, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
                    reason="flash_attention_2 training needs CUDA and the flash_attn package (none here)")
def test_packed_pretraining_with_flash_attention_on_gpu(pretrain_data, tmp_path):
    output = tmp_path / "run"
    pretrain.main(pretrain_args(pretrain_data, output, "scbert2-tiny", "--max_steps", "2", "--logging_steps", "1",
                                "--packed", "--attn_implementation", "flash_attention_2", "--mixed_precision", "bf16"))
    assert all(np.isfinite(r["loss"]) for r in step_records(output))


def test_pack_padded_batch_matches_the_tokenizers_packed_layout(cells):
    tokenizer = GeneExpressionTokenizer.from_adata(cells, mode="scbert2", max_length=48)
    rows = [{**row, "label": 1} for row in rows_with_index(tokenizer.to_dataset(cells), range(8))]
    ours = pack_padded_batch(dict(tokenizer.collate(rows, return_tensors="pt")))
    theirs = tokenizer.collate(rows, return_tensors="pt", packed=True)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert (ours[key] == theirs[key]) if isinstance(ours[key], int) else torch.equal(ours[key], theirs[key]), key


def test_pretraining_and_finetuning_run_on_packed_batches(pretrain_data, finetune_data, tmp_path):
    output = tmp_path / "pretrain"
    pretrain.main(pretrain_args(pretrain_data, output, "scbert2-tiny", "--max_steps", "2", "--logging_steps", "1",
                                "--packed", "--attn_implementation", "eager"))
    records = step_records(output)
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    assert records[0]["cells_per_second"] > 0
    results = finetune.main(finetune_args(finetune_data, tmp_path / "finetune", "--model", str(output / "model"),
                                          "--num_epochs", "1", "--no_baseline", "--packed"))
    assert 0.0 <= results["model"]["macro_f1"] <= 1.0 and results["split"]["test"] == 18
    with pytest.raises(ValueError, match="--packed needs scBERT 2.0"):
        pretrain.main(pretrain_args(pretrain_data, tmp_path / "v1", "scbert-small", "--max_steps", "1", "--packed"))
    with pytest.raises(ValueError, match="--attn_implementation applies to scBERT 2.0"):
        pretrain.main(pretrain_args(pretrain_data, tmp_path / "v1", "scbert-small", "--max_steps", "1",
                                    "--attn_implementation", "sdpa"))


# ------------------------------------------------------------------------------------------------- 8. new-user bugs
def test_a_checkpoint_is_resumed_only_by_the_run_that_wrote_it(pretrain_data, finetune_data, tmp_path):
    output = tmp_path / "run"

    def run(data: Path, *extra: str):
        return pretrain.main(pretrain_args(data, output, "scbert2-tiny", "--max_steps", "2", "--checkpointing_steps",
                                           "2", "--resume_from_checkpoint", "latest", *extra))

    run(pretrain_data)
    state = json.loads((output / "checkpoints" / "checkpoint-2" / STATE_FILE).read_text())
    assert {"data", "architecture", "vocabulary"} <= state["run"].keys()
    run(pretrain_data)  # the same run resumes (and, finished, trains no further)
    with pytest.raises(ValueError, match=r"Refusing to resume .*other training data.*another --output_dir"):
        run(finetune_data)  # same genes, other cells: the silent-resume bug
    with pytest.raises(ValueError, match=r"another architecture \(.*num_hidden_layers"):
        run(pretrain_data, "--architecture", "scbert2-small")
    # A checkpoint written before checkpoints recorded their run cannot be checked, so it is not resumed.
    state.pop("run")
    (output / "checkpoints" / "checkpoint-2" / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(ValueError, match="records no run identity"):
        run(pretrain_data)


def test_finetune_refuses_a_single_class_and_splits_without_training_cells(finetune_data, tmp_path):
    import anndata as ad

    single = ad.read_h5ad(finetune_data)
    single.obs["cell_type1"] = "beta"
    single.write_h5ad(tmp_path / "single.h5ad")
    with pytest.raises(ValueError, match=r"single class \(\['beta'\]\)"):
        finetune.main(finetune_args(tmp_path / "single.h5ad", tmp_path / "run", "--architecture", "scbert2-tiny"))

    labels = np.repeat([0, 1], [40, 2])  # the rare class has one cell left after the test fold
    outcomes = []
    for seed in range(12):
        try:
            split = finetune.split_cells(labels, ["common", "rare"], _split_args(kfold=2, validation_size=0.5, seed=seed))
        except ValueError as error:
            assert "no training cell for ['rare']" in str(error)
            outcomes.append("refused")
        else:
            assert set(labels[split["train"]]) == {0, 1}
            outcomes.append("split")
    assert "refused" in outcomes


def test_tokenized_data_is_cached_under_the_datasets_cache_not_beside_the_data(pretrain_data, tmp_path, monkeypatch):
    import datasets

    from train.data import load_tokenized_dataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    tokenizer = GeneExpressionTokenizer.from_adata(ad_read(pretrain_data), mode="scbert2", max_length=64)
    dataset = load_tokenized_dataset([str(pretrain_data)], tokenizer)
    assert len(dataset) == N_CELLS
    assert len(list((tmp_path / "hf_cache" / "scbert").glob("cells-*"))) == 1
    assert not (pretrain_data.parent / ".scbert_cache").exists()


def ad_read(path: Path):
    import anndata as ad

    return ad.read_h5ad(path)


def test_min_overlap_flag_reaches_the_tokenizer(pretrain_data, tmp_path):
    folder = pretrain.main(pretrain_args(pretrain_data, tmp_path / "pt", "scbert2-tiny", "--max_steps", "1"))
    few_genes = ad_read(pretrain_data)[:, :90].copy()  # 30% of the vocabulary
    few_genes.write_h5ad(tmp_path / "few.h5ad")
    args = pretrain_args(tmp_path / "few.h5ad", tmp_path / "more", "scbert2-tiny", "--max_steps", "1")
    args[args.index("--architecture"):args.index("--architecture") + 2] = ["--model", str(folder)]
    with pytest.raises(ValueError, match="--min_overlap"):
        pretrain.main(args)
    pretrain.main(args + ["--min_overlap", "0.2"])
    assert GeneExpressionTokenizer.from_pretrained(tmp_path / "more" / "model").min_overlap == 0.2


def test_few_shot_split_draws_k_cells_per_type_and_tests_on_the_rest():
    labels = np.repeat([0, 1, 2], [40, 10, 5])
    split = finetune.few_shot_split(labels, 5, seed=3)
    assert np.bincount(labels[split["train"]]).tolist() == [5, 5, 2]  # capped at half of a type's cells
    assert np.array_equal(split["validation"], split["train"])  # no cells to spare: training cells stand in
    assert np.array_equal(np.sort(np.concatenate([split["train"], split["test"]])), np.arange(len(labels)))
    assert np.array_equal(finetune.few_shot_split(labels, 5, seed=3)["train"], split["train"])
    assert not np.array_equal(finetune.few_shot_split(labels, 5, seed=4)["train"], split["train"])
    with pytest.raises(ValueError, match="--labelled_per_class must be >= 1"):
        finetune.few_shot_split(labels, 0, seed=0)


def test_few_shot_finetuning_selects_genes_on_all_cells_and_reports_the_split(finetune_data, tmp_path):
    output = tmp_path / "few"
    results = finetune.main(finetune_args(finetune_data, output, "--architecture", "scbert2-tiny",
                                          "--labelled_per_class", "4", "--num_epochs", "2"))
    assert results["split"]["train"] == 12 and results["split"]["test"] == 3 * CELLS_PER_CLASS - 12
    assert results["split"]["train_per_class"] == {name: 4 for name in FINETUNE_CLASSES}
    assert results["baseline_logistic_regression_l1"]["accuracy"] >= 0
    split = json.loads((output / "split.json").read_text())
    assert not set(split["train"]) & set(split["test"])


@pytest.mark.parametrize("gene_table", ["pretrained", "data"])
def test_finetuning_a_checkpoint_keeps_or_replaces_its_gene_table(pretrain_data, finetune_data, tmp_path, gene_table):
    pretrained = pretrain.main(pretrain_args(pretrain_data, tmp_path / "pt", "scbert2-tiny", "--max_steps", "1"))
    table = weights(pretrained)["model.embeddings.gene_embeddings.weight"]
    output = tmp_path / "ft"
    finetune.main(finetune_args(finetune_data, output, "--model", str(pretrained), "--gene_table", gene_table,
                                "--freeze_gene_embeddings", "--num_epochs", "1", "--no_baseline"))
    tuned = weights(output / "model")["model.embeddings.gene_embeddings.weight"]
    assert torch.equal(tuned, table) == (gene_table == "pretrained")


def test_a_zero_encoder_learning_rate_keeps_the_pretrained_layers_and_trains_the_rest(pretrain_data, finetune_data,
                                                                                     tmp_path):
    pretrained = pretrain.main(pretrain_args(pretrain_data, tmp_path / "pt", "scbert2-tiny", "--max_steps", "1"))
    tuned = {}
    for run, extra in (("trained_table", ()), ("frozen_table", ("--freeze_gene_embeddings",))):
        finetune.main(finetune_args(finetune_data, tmp_path / run, "--model", str(pretrained), "--num_epochs", "2",
                                    "--encoder_learning_rate_scale", "0", "--no_baseline", "--ema_decay", "0", *extra))
        tuned[run] = weights(tmp_path / run / "model")
    before, after = weights(pretrained), tuned["trained_table"]
    table = "model.embeddings.gene_embeddings.weight"
    encoder = [name for name in after if name.startswith("model.") and name != table]
    assert len(encoder) > 10 and all(torch.equal(after[name], before[name]) for name in encoder)
    # Both runs start from the same aligned table (same seed); only the first trains it, at the full rate.
    assert not torch.equal(after[table], tuned["frozen_table"][table])


def test_learning_rate_scales_give_their_parameters_their_own_groups():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    args = argparse.Namespace(weight_decay=0.01, optim="adamw", learning_rate=1e-3)
    groups = build_optimizer(model, args, {"0.weight": 0.1, "0.bias": 0.1}).param_groups
    by_lr = {(group["lr"], group["weight_decay"]): len(group["params"]) for group in groups}
    assert by_lr == {(1e-3, 0.01): 1, (1e-3, 0.0): 3, (1e-4, 0.01): 1, (1e-4, 0.0): 1}
    unscaled = build_optimizer(model, args).param_groups
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in unscaled] == [(1e-3, 0.01, 2), (1e-3, 0.0, 4)]


def test_max_length_replaces_the_checkpoints_token_budget(pretrain_data, finetune_data, tmp_path):
    pretrained = pretrain.main(pretrain_args(pretrain_data, tmp_path / "pt", "scbert2-tiny", "--max_steps", "1"))
    output = tmp_path / "ft"
    finetune.main(finetune_args(finetune_data, output, "--model", str(pretrained), "--num_epochs", "1",
                                "--no_baseline", "--max_length", "16"))
    tokenizer = GeneExpressionTokenizer.from_pretrained(output / "model")
    assert GeneExpressionTokenizer.from_pretrained(pretrained).max_length == 64 and tokenizer.max_length == 16
    batch = tokenizer(ad_read(finetune_data)[:8], return_tensors="pt")
    assert batch["input_ids"].shape[1] == 16  # CLS + the 15 most expressed selected genes


def test_the_aligned_gene_table_is_the_data_table_turned_toward_the_checkpoints(pretrain_data, finetune_data, tmp_path):
    pretrained = pretrain.main(pretrain_args(pretrain_data, tmp_path / "pt", "scbert2-tiny", "--max_steps", "1"))
    checkpoint = weights(pretrained)["model.embeddings.gene_embeddings.weight"][3:].double()
    tables = {}
    for gene_table in ("data", "aligned", "default"):
        flag = () if gene_table == "default" else ("--gene_table", gene_table)
        finetune.main(finetune_args(finetune_data, tmp_path / gene_table, "--model", str(pretrained), *flag,
                                    "--freeze_gene_embeddings", "--num_epochs", "1", "--no_baseline"))
        tables[gene_table] = weights(tmp_path / gene_table / "model")["model.embeddings.gene_embeddings.weight"][3:].double()
    data, aligned = tables["data"], tables["aligned"]
    torch.testing.assert_close(aligned @ aligned.T, data @ data.T, atol=1e-4, rtol=1e-4)  # a rotation of it
    assert torch.dist(aligned, checkpoint) < torch.dist(data, checkpoint)
    torch.testing.assert_close(tables["default"], aligned)


def test_add_data_genes_grows_the_vocabulary_and_the_gene_table_by_the_datas_new_genes(pretrain_data, finetune_data,
                                                                                       tmp_path):
    import scipy.sparse as sp
    from scipy.linalg import orthogonal_procrustes

    corpus = ad_read(pretrain_data)[:, :-40].copy()  # the checkpoint never saw the data's last 40 genes
    corpus.write_h5ad(tmp_path / "corpus.h5ad")
    pretrained = pretrain.main(pretrain_args(tmp_path / "corpus.h5ad", tmp_path / "pt", "scbert2-tiny",
                                             "--max_steps", "1"))
    tables = {}
    for gene_table, flag in (("data", ["--add_data_genes"]), ("aligned", []), ("kept", ["--no-add_data_genes"])):
        finetune.main(finetune_args(finetune_data, tmp_path / gene_table, "--model", str(pretrained), *flag,
                                    "--gene_table", "data" if gene_table == "data" else "aligned",
                                    "--freeze_gene_embeddings", "--num_epochs", "1", "--no_baseline"))
        tables[gene_table] = weights(tmp_path / gene_table / "model")["model.embeddings.gene_embeddings.weight"][3:]
    output = tmp_path / "aligned"  # the default: a pretrained scBERT 2.0 folder reads the data's genes too
    assert GeneExpressionTokenizer.from_pretrained(tmp_path / "kept" / "model").genes == \
        GeneExpressionTokenizer.from_pretrained(pretrained).genes

    cells = ad_read(finetune_data)
    expressing = np.asarray((sp.csr_matrix(cells.X) > 0).sum(axis=0)).ravel()
    new_genes = [g for g, n in zip(cells.var_names[-40:], expressing[-40:]) if n >= 3]
    assert 0 < len(new_genes)
    old, tokenizer = GeneExpressionTokenizer.from_pretrained(pretrained), GeneExpressionTokenizer.from_pretrained(output / "model")
    assert tokenizer.genes == old.genes + new_genes
    model = AutoModelForSequenceClassification.from_pretrained(output / "model")
    assert model.config.vocab_size == len(tokenizer) == model.get_input_embeddings().weight.shape[0]
    assert tables["data"][old.num_genes:].norm(dim=1).min() > 0  # the new genes' vectors come from the data's SVD
    # The rotation is fitted on the genes the checkpoint has vectors for: the new rows have nothing to align to.
    checkpoint = weights(pretrained)["model.embeddings.gene_embeddings.weight"][3:].double()
    data = tables["data"].double()
    rotation, _ = orthogonal_procrustes(data[:old.num_genes].numpy(), checkpoint.numpy())
    torch.testing.assert_close(tables["aligned"].double(), data @ torch.from_numpy(rotation), atol=1e-5, rtol=1e-4)
    batch = tokenizer(cells, return_tensors="pt")
    assert batch["input_ids"].max() >= len(old)  # cells are read through the new genes
    with torch.no_grad():
        assert model(**batch).logits.shape == (cells.n_obs, len(FINETUNE_CLASSES))


def test_add_data_genes_needs_a_scbert2_model_folder(finetune_data, tmp_path):
    from train.genes import add_data_genes

    with pytest.raises(ValueError, match="without a folder the vocabulary is already every gene"):
        finetune.main(finetune_args(finetune_data, tmp_path / "ft", "--architecture", "scbert2-tiny",
                                    "--add_data_genes"))
    v1 = GeneExpressionTokenizer(genes=["ACTB"], mode="scbert")
    with pytest.raises(ValueError, match="fixed panel of its positional table"):
        add_data_genes(v1, ad_read(finetune_data))

"""Model folders and architectures: what a training script builds, loads and saves."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import AutoConfig

import modeling_scbert
from tokenization import GeneExpressionTokenizer


def tokenizer_overrides(args) -> dict[str, Any]:
    """Tokenizer settings given on the command line (``--min_overlap``), for a new or a loaded tokenizer."""
    return {} if args.min_overlap is None else {"min_overlap": args.min_overlap}


def load_pretrained_folder(folder: str | os.PathLike, expected_types=("scbert", "scbert2"), **tokenizer_kwargs: Any):
    """Reads a model folder's config and tokenizer (``tokenizer_kwargs`` override its saved settings), with a clear
    error for a folder of another model type."""
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
    return config, GeneExpressionTokenizer.from_pretrained(folder, **tokenizer_kwargs)


def is_classifier(config) -> bool:
    """Whether a folder's config is a cell type classifier (a ...ForSequenceClassification head)."""
    return any(name.endswith("ForSequenceClassification") for name in (config.architectures or []))


def is_scbert_v1(architecture: str) -> bool:
    return architecture in modeling_scbert.configuration_scbert.PRESETS


def parse_overrides(spec: str, flag: str = "--config_overrides takes a config.json or") -> dict[str, Any]:
    """Config fields from a config.json path or ``KEY=VALUE,...`` (values read as JSON when they parse: ``2``,
    ``null``, ``true``; as strings otherwise). ``flag`` starts the error message."""
    if spec.endswith(".json"):
        return json.loads(Path(spec).read_text())
    overrides = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{flag} KEY=VALUE pairs; got {item!r}.")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def architecture_config(architecture: str, tokenizer: GeneExpressionTokenizer, **overrides: Any):
    """A fresh config for ``architecture``: a preset of scBERT 2.0 (``scbert2-*``) or of scBERT v1 (``scbert``,
    ``scbert-small``), sized to the tokenizer's vocabulary."""
    if architecture in modeling_scbert.configuration_scbert2.PRESETS:
        # Mean pooling: masked-regression pretraining never trains the CLS output, the gene tokens it does train.
        return modeling_scbert.ScBert2Config.from_preset(
            architecture, vocab_size=tokenizer.vocab_size, num_bins=tokenizer.num_bins, **{"pooling": "mean", **overrides}
        )
    if is_scbert_v1(architecture):
        return modeling_scbert.ScBertConfig.from_preset(
            architecture, num_tokens=tokenizer.num_bins + 2, max_seq_len=tokenizer.sequence_length, **overrides
        )
    presets = sorted(modeling_scbert.configuration_scbert.PRESETS) + sorted(modeling_scbert.configuration_scbert2.PRESETS)
    raise ValueError(f"Unknown architecture {architecture!r}: expected one of {presets}.")


def architecture_mode(architecture: str) -> str:
    """The tokenizer mode an architecture reads: scBERT's full panel or scBERT 2.0's expressed genes."""
    return "scbert" if is_scbert_v1(architecture) else "scbert2"


def attention_kwargs(model_type: str, attn_implementation: str | None) -> dict[str, str]:
    """``attn_implementation`` for from_pretrained / from_config; scBERT v1's FAVOR+ attention has no backends."""
    if attn_implementation is None:
        return {}
    if model_type != "scbert2":
        raise ValueError(f"--attn_implementation applies to scBERT 2.0; scBERT v1 ({model_type!r}) has its own "
                         "FAVOR+ linear attention. Leave the flag out for scBERT v1.")
    return {"attn_implementation": attn_implementation}


def save_model_folder(model, tokenizer: GeneExpressionTokenizer, folder: str | os.PathLike,
                      accelerator: Accelerator | None = None) -> None:
    """save_pretrained of model and tokenizer into one folder (safetensors + config + tokenizer + source files)."""
    if accelerator is not None:
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return
        model = accelerator.unwrap_model(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def frozen_encoder_head(head_class, folder: str | os.PathLike, config, from_scratch: bool = False):
    """A task head (synergy, perturbation) on the encoder of a pretrained folder, with `config` (that folder's, with
    the head's settings), or with `from_scratch` on a randomly initialised encoder of the same shape (the ablation).
    The encoder is frozen and pools by mean: masked-regression pretraining never trains the CLS output."""
    if config.pooling == "cls":
        config.pooling = "mean"
    model = head_class(config) if from_scratch else head_class.from_pretrained(folder, config=config)
    model.model.requires_grad_(False)
    return model


@torch.no_grad()
def embed_cells(model, tokenizer: GeneExpressionTokenizer, adata, batch_size: int = 256) -> torch.Tensor:
    """[cells, pooled_size] embeddings of a head's frozen encoder (`model.embed_cells`, eval mode), on the CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts = []
    for start in range(0, adata.n_obs, batch_size):
        batch = tokenizer(adata[start:start + batch_size], return_tensors="pt")
        parts.append(model.embed_cells(*(batch[key].to(device) for key in ("input_ids", "values", "attention_mask"))))
    model.train(was_training)
    return torch.cat(parts).float().cpu()

"""The benchmarked models: one `ModelSpec` per variant in `REGISTRY`.

Every model is a cell-type classifier (the annotation task) built at random initialisation with a fixed seed: speed,
memory and FLOPs do not depend on the weights. Adding a variant is one line in `REGISTRY`.
"""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from benchmarks.data import (
    ANNOTATION_HIGHLY_VARIABLE_GENES,
    ANNOTATION_MAX_LENGTH,
    GENEFORMER_VOCAB,
    SCBERT_PANEL_GENES,
    Cells,
    geneformer_inputs,
    scbert2_annotation_inputs,
    scbert2_inputs,
    scbert_native_inputs,
    scbert_panel_inputs,
)
from modeling_scbert import ScBert2Config, ScBert2ForSequenceClassification, ScBertConfig, ScBertForSequenceClassification

BuildFn = Callable[[Cells], nn.Module]
InputFn = Callable[[Cells, np.ndarray], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked variant.

    build: (cells) -> classifier whose forward takes the input_fn's tensors (+ `labels` for training) and returns an
        output with `.logits` and, given labels, `.loss`.
    family: groups variants for the targets ("scbert-original", "geneformer", "scbert2-small", ...).
    compile: wrap the built model in torch.compile.
    batch_sizes / train_batch_size: inference batch sizes and the training batch size.
    single_cells: how many different cells the batch-1 measurement runs through.
    requires: "cuda", "flash_attn", "bitsandbytes": skipped with a note when missing.
    in_default_run: part of `run.py` without --models.
    """

    name: str
    build: BuildFn
    input_fn: InputFn
    family: str
    description: str
    compile: bool = False
    batch_sizes: tuple[int, ...] = (1, 32)
    train_batch_size: int | None = 4
    single_cells: int = 8
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    requires: tuple[str, ...] = field(default_factory=tuple)
    in_default_run: bool = True

    def missing_requirement(self) -> str | None:
        """Why this variant cannot run here, or None."""
        for need in self.requires:
            if need == "cuda" and not torch.cuda.is_available():
                return "needs CUDA (no GPU on this machine)"
            if need != "cuda" and importlib.util.find_spec(need) is None:
                return f"needs the {need} package"
        return None


# ------------------------------------------------------------------------------------------------ builders
class OriginalScBertClassifier(nn.Module):
    """scBERT exactly as finetune.py builds it: performer-pytorch's PerformerLM (scBERT vendors 1.0.6) whose output
    layer is replaced by the `Identity` conv + MLP head.

    scBERT passes g2v_position_emb=True (a frozen gene2vec table added to the token embeddings). Pip's 1.0.6 has no
    such flag; with rotary_position_emb=False it adds a learned AbsolutePositionalEmbedding of the same shape
    [max_seq_len, 200] instead: the same compute.
    """

    def __init__(self, num_labels: int, seq_len: int):
        super().__init__()
        from performer_pytorch import PerformerLM

        self.performer = PerformerLM(
            num_tokens=7, dim=200, depth=6, max_seq_len=seq_len, heads=10, dim_head=64, local_attn_heads=0,
            rotary_position_emb=False,
        )
        self.performer.to_out = None
        # finetune.py's Identity(h_dim=128): conv over the hidden size, then fc1(seq_len -> 512) -> fc2 -> fc3.
        self.conv1 = nn.Conv2d(1, 1, (1, 200))
        self.fc1 = nn.Linear(seq_len, 512)
        self.fc2 = nn.Linear(512, 128)
        self.fc3 = nn.Linear(128, num_labels)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **unused) -> SequenceClassifierOutput:
        hidden = self.performer(input_ids, return_encodings=True)  # [B, L, 200]
        x = torch.relu(self.conv1(hidden.unsqueeze(1))).flatten(1)  # [B, 1, L, 200] -> [B, 1, L, 1] -> [B, L]
        logits = self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def original_scbert(cells: Cells, seq_len: int | None = None) -> nn.Module:
    """seq_len defaults to the data's own genes + scBERT's trailing token."""
    return OriginalScBertClassifier(cells.num_labels, seq_len or cells.adata.n_vars + 1)


def scbert_v1_port(cells: Cells) -> nn.Module:
    """This project's transformers port of scBERT at the published size, with scBERT's conv fine-tuning head."""
    return ScBertForSequenceClassification(ScBertConfig(num_labels=cells.num_labels))


def geneformer(cells: Cells, attn_implementation: str = "sdpa") -> nn.Module:
    """transformers' BertForSequenceClassification with Geneformer's published 6-layer configuration (~10M
    parameters, most of them the 25,426-token gene embedding)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=GENEFORMER_VOCAB, hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=2048, hidden_act="relu", layer_norm_eps=1e-12,
        hidden_dropout_prob=0.02, attention_probs_dropout_prob=0.02, pad_token_id=0, num_labels=cells.num_labels,
    )
    return BertForSequenceClassification._from_config(config, attn_implementation=attn_implementation)


def scbert2(cells: Cells, preset: str, attn_implementation: str) -> nn.Module:
    config = ScBert2Config.from_preset(preset, vocab_size=cells.vocab_size, num_labels=cells.num_labels)
    return ScBert2ForSequenceClassification._from_config(config, attn_implementation=attn_implementation)


def scbert2_int8(cells: Cells, preset: str) -> nn.Module:
    """bitsandbytes LLM.int8() linear layers, loaded the transformers way (from_pretrained + quantization_config)."""
    from transformers import BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as folder:
        scbert2(cells, preset, "sdpa").save_pretrained(folder)
        return ScBert2ForSequenceClassification.from_pretrained(
            folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cuda",
            attn_implementation="sdpa",
        )


# ------------------------------------------------------------------------------------------------ registry
PANEL_LEN = SCBERT_PANEL_GENES + 1
# The original scBERT takes ~15 s per cell on 2 cores: batch 32 would take minutes per repeat, so its largest
# inference batch is 2 and it trains on single cells (its own fine-tuning batch size is 3). Every cell has the same
# length (the whole panel), so one cell stands for all at batch 1. The port does the same math: batch 1 only.
PERFORMER_SIZES = {"batch_sizes": (1, 2), "train_batch_size": 1, "single_cells": 1}

REGISTRY: list[ModelSpec] = [
    ModelSpec("scbert-original", partial(original_scbert, seq_len=PANEL_LEN), scbert_panel_inputs, "scbert-original",
              "performer-pytorch 1.0.6 PerformerLM as in scBERT, 16,906-gene panel + 1", **PERFORMER_SIZES),
    ModelSpec("scbert-original-native", original_scbert, scbert_native_inputs, "scbert-original-native",
              "same, over Baron's own 14,877 genes + 1", batch_sizes=(1,), train_batch_size=None, single_cells=1),
    ModelSpec("scbert-v1-port", scbert_v1_port, scbert_panel_inputs, "scbert-v1-port",
              "this project's ScBertForSequenceClassification, published size, 16,907 tokens",
              **{**PERFORMER_SIZES, "batch_sizes": (1,)}),
    ModelSpec("geneformer-10m-sdpa", geneformer, geneformer_inputs, "geneformer",
              "BertForSequenceClassification, Geneformer 6L/256/4 heads config, rank-ordered genes <= 2,048"),
    *[
        ModelSpec(f"{preset}-{attn}", partial(scbert2, preset=preset, attn_implementation=attn), scbert2_inputs,
                  preset, f"ScBert2ForSequenceClassification {preset}, {attn} attention")
        for preset in ("scbert2-small", "scbert2-moe") for attn in ("eager", "sdpa")
    ],
    *[
        ModelSpec(f"{preset}-compile", partial(scbert2, preset=preset, attn_implementation="sdpa"), scbert2_inputs,
                  preset, f"ScBert2ForSequenceClassification {preset}, sdpa + torch.compile", compile=True)
        for preset in ("scbert2-small", "scbert2-moe")
    ],
    # Not in the targets (those compare every model on the same expressed genes): the speed at which a model
    # fine-tuned with train/finetune.py's defaults annotates, i.e. at the cross-validated macro-F1.
    *[
        ModelSpec(f"{preset}-sdpa-annotation", partial(scbert2, preset=preset, attn_implementation="sdpa"),
                  scbert2_annotation_inputs, f"{preset}-annotation",
                  f"{preset}, sdpa, the fine-tuned annotation input: <= {ANNOTATION_MAX_LENGTH} tokens from "
                  f"{ANNOTATION_HIGHLY_VARIABLE_GENES:,} highly variable genes")
        for preset in ("scbert2-small", "scbert2-moe")
    ],
    ModelSpec("scbert2-tiny-sdpa", partial(scbert2, preset="scbert2-tiny", attn_implementation="sdpa"),
              scbert2_inputs, "scbert2-tiny", "ScBert2ForSequenceClassification scbert2-tiny (smoke-test size)",
              in_default_run=False),
    # GPU variants: measured only where CUDA is present.
    ModelSpec("scbert2-small-fa2-bf16", partial(scbert2, preset="scbert2-small", attn_implementation="flash_attention_2"),
              scbert2_inputs, "scbert2-small-gpu", "scbert2-small, flash_attention_2, bf16", device="cuda",
              dtype=torch.bfloat16, requires=("cuda", "flash_attn")),
    ModelSpec("scbert2-small-sdpa-bf16", partial(scbert2, preset="scbert2-small", attn_implementation="sdpa"),
              scbert2_inputs, "scbert2-small-gpu", "scbert2-small, sdpa, bf16", device="cuda", dtype=torch.bfloat16,
              requires=("cuda",)),
    ModelSpec("scbert2-small-int8-bnb", partial(scbert2_int8, preset="scbert2-small"), scbert2_inputs,
              "scbert2-small-gpu", "scbert2-small, bitsandbytes int8 weights (inference only)", device="cuda",
              train_batch_size=None, requires=("cuda", "bitsandbytes")),
    ModelSpec("geneformer-10m-sdpa-bf16", geneformer, geneformer_inputs, "geneformer-gpu",
              "Geneformer-size BERT, sdpa, bf16", device="cuda", dtype=torch.bfloat16, requires=("cuda",)),
]

SPECS = {spec.name: spec for spec in REGISTRY}
assert len(SPECS) == len(REGISTRY), "model names must be unique"

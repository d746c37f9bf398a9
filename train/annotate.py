"""Cell type annotation with a fine-tuned classifier folder, written into the AnnData the way scanpy users expect.

    adata = annotate(adata, "outputs/main/model")
    adata.obs["scbert_cell_type"], adata.obs["scbert_confidence"], adata.obsm["X_scbert"], adata.uns["scbert"]

Cells are tokenized by the folder's tokenizer, batched in order of length (little padding) and run under
`torch.inference_mode`; the results come back in the input's cell order. The cell embedding is the vector the
classification head reads (its pooling).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch


@torch.inference_mode()
def predict_cells(model, tokenizer, adata, batch_size: int = 64, gene_key: str | None = None):
    """Logits and pooled embeddings of every cell of ``adata`` (input order), and the tokenizer's match report."""
    X = tokenizer.encode_matrix(adata, gene_key=gene_key)
    cells = list(tokenizer._iter_cells(X))
    order = np.argsort([len(cell["gene_ids"]) for cell in cells], kind="stable")
    model.eval()
    logits, embeddings = [None] * len(cells), [None] * len(cells)
    for start in range(0, len(cells), batch_size):
        rows = order[start:start + batch_size]
        batch = tokenizer.collate([cells[i] for i in rows], return_tensors="pt").to(model.device)
        outputs = model(**batch)
        pooled = getattr(outputs, "pooled_output", None)  # scBERT v1's head returns none
        for i, row in enumerate(rows):
            logits[row] = outputs.logits[i].float().cpu().numpy()
            embeddings[row] = None if pooled is None else pooled[i].float().cpu().numpy()
    return np.stack(logits), (None if embeddings[0] is None else np.stack(embeddings)), tokenizer.last_report


def annotate(adata, model: str | os.PathLike | torch.nn.Module, tokenizer=None, batch_size: int = 64,
             gene_key: str | None = None):
    """Writes the predicted type, its probability, the embedding and what was done into ``adata``; returns it."""
    from transformers import AutoModelForSequenceClassification

    import modeling_scbert  # noqa: F401  (registers the family with the Auto classes: no remote code needed)
    from tokenization import GeneExpressionTokenizer

    source = str(model) if not isinstance(model, torch.nn.Module) else getattr(model, "name_or_path", "")
    if not isinstance(model, torch.nn.Module):
        tokenizer = tokenizer or GeneExpressionTokenizer.from_pretrained(model)
        model = AutoModelForSequenceClassification.from_pretrained(model)
    if tokenizer is None:
        raise ValueError("Pass the tokenizer with an in-memory model (or a folder, which holds both).")
    start = time.perf_counter()
    logits, embeddings, report = predict_cells(model, tokenizer, adata, batch_size, gene_key)
    probabilities = torch.softmax(torch.as_tensor(logits), dim=-1).numpy()
    id2label = model.config.id2label
    adata.obs["scbert_cell_type"] = [id2label[int(i)] for i in probabilities.argmax(-1)]
    adata.obs["scbert_confidence"] = probabilities.max(-1)
    if embeddings is not None:
        adata.obsm["X_scbert"] = embeddings
    adata.uns["scbert"] = {"model": source, "gene_match": str(report), "seconds": time.perf_counter() - start,
                           "cells": int(adata.n_obs)}
    return adata

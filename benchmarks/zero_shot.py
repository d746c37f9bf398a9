"""Zero-shot cell embeddings (no labels, no fine-tuning): does the pretrained checkpoint place cells of one type
together better than PCA of the expression?

    python -m benchmarks.zero_shot                          # Baron mouse and pbmc68k_reduced, shipped checkpoints

For each data set: the mean-pooled last hidden state of the checkpoint, its tokens drawn from the most expressed
genes (as in pretraining) or from the data set's 2,000 highly variable genes (as in fine-tuning; no labels read);
the cell's expression read through the checkpoint's gene table alone (the fine-tuning head's expression pooling;
untrained, a random projection of the expression); the same architecture untrained (a control: what the tokenizer
and a random encoder alone give); and PCA with 50
components of the log-normalised, scaled highly variable genes (at most 2,000: scanpy's standard recipe). Scored by the
accuracy of a 10-nearest-neighbour classifier in 5-fold stratified cross-validation, its macro-F1, and the
silhouette of the known types (cosine). Writes benchmarks/results/zero_shot/<--name>.json and .md. scBERT v1 reads
its whole fixed panel, pooled two ways: the mean of all its genes' hidden states, and of the genes the cell expresses
(bin > 0; on Baron over 90% of a cell's panel positions are zeros, which dominate the first mean).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.annotation_cv import BUNDLED_LABEL_KEYS, write_bundled_dataset
from train.annotate import predict_cells

ROOT = Path(__file__).resolve().parents[1]
BARON = ROOT.parent / "shared" / "data" / "celltype" / "baron_mouse_pancreas.h5ad"
DATASETS = {"baron_mouse_pancreas": (str(BARON), "cell_type1"), "pbmc68k_reduced": ("pbmc68k_reduced", "bulk_labels")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", default=[str(ROOT / "checkpoints" / "scbert2-small"),
                                                              str(ROOT / "checkpoints" / "scbert2-moe")])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--highly_variable_genes", type=int, nargs="+", default=[0, 2000],
                        help="token choices to score: 0 = the most expressed genes (as in pretraining), N = the "
                             "N highly variable genes of the data set (as in fine-tuning)")
    parser.add_argument("--name", default="zero_shot", help="results file stem under --results_dir")
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "zero_shot"))
    parser.add_argument("--results_dir", default=str(ROOT / "benchmarks" / "results" / "zero_shot"))
    return parser.parse_args(argv)


def embed(folder: str, adata, batch_size: int, pretrained: bool = True, highly_variable_genes: int = 0,
          expressed_only: bool = False) -> np.ndarray:
    """Mean-pooled last hidden states of every cell, in order; with ``highly_variable_genes`` the tokens come from
    that many highly variable genes of these cells (no labels read), as fine-tuning draws them. ``expressed_only``:
    scBERT v1's mean over the panel genes the cell expresses. scBERT 2.0: each row is followed by the cell's
    expression read through the gene table (the classifier's expression pooling: the sum of value x gene vector over
    the cell's tokens), which no encoder layer touches; both come from one pass, [cells, H + H]."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    import modeling_scbert  # noqa: F401  (registers the family)
    from tokenization import GeneExpressionTokenizer

    tokenizer = GeneExpressionTokenizer.from_pretrained(folder)
    if tokenizer.mode == "scbert":
        return mean_gene_states(folder, tokenizer, adata, batch_size, pretrained, expressed_only)
    head = {"num_labels": 1, "pooling": "mean", "expression_pooling": True}
    if pretrained:
        model = AutoModelForSequenceClassification.from_pretrained(folder, **head)
    else:
        config = AutoConfig.from_pretrained(folder, **head)
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config)
    if highly_variable_genes:
        from train.genes import highly_variable_genes as select

        tokenizer.selected_genes = select(tokenizer.encode_matrix(adata), tokenizer, highly_variable_genes)
    return predict_cells(model, tokenizer, adata, batch_size)[1]


@torch.inference_mode()
def mean_gene_states(folder: str, tokenizer, adata, batch_size: int, pretrained: bool,
                     expressed_only: bool = False) -> np.ndarray:
    """scBERT v1 (its classifier reads every position, it pools nothing): the mean of the panel genes' last hidden
    states (scBERT's trailing extra token left out), or of those the cell expresses (a cell expressing none of them
    gets the mean of all)."""
    from transformers import AutoConfig, AutoModel

    if pretrained:
        model = AutoModel.from_pretrained(folder)
    else:
        torch.manual_seed(0)
        model = AutoModel.from_config(AutoConfig.from_pretrained(folder))
    model.eval()
    parts = []
    for start in range(0, adata.n_obs, batch_size):
        batch = tokenizer(adata[start:start + batch_size], return_tensors="pt")
        states = model(**batch).last_hidden_state[:, :-1]  # [cells, panel genes, hidden]
        weights = torch.ones(states.shape[:2])
        if expressed_only:
            expressed = (batch["input_ids"][:, :-1] > 0).float()
            weights = torch.where(expressed.sum(1, keepdim=True) > 0, expressed, weights)
        parts.append((states * weights[..., None]).sum(1) / weights.sum(1, keepdim=True))  # [cells, hidden]
    return torch.cat(parts).numpy()


def pca_embedding(adata, components: int = 50) -> np.ndarray:
    import scanpy as sc

    cells = adata.copy()
    if np.all(np.mod(cells.X.data[:10000] if hasattr(cells.X, "data") else cells.X[:100], 1) == 0):
        sc.pp.normalize_total(cells, target_sum=1e4)
        sc.pp.log1p(cells)
    sc.pp.highly_variable_genes(cells, n_top_genes=min(2000, cells.n_vars - 1))
    cells = cells[:, cells.var["highly_variable"]].copy()
    sc.pp.scale(cells, max_value=10)
    sc.tl.pca(cells, n_comps=min(components, cells.n_vars - 1, cells.n_obs - 1), random_state=0)
    return cells.obsm["X_pca"]


def score(vectors: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    predicted = cross_val_predict(KNeighborsClassifier(n_neighbors=10, metric="cosine"), vectors, labels, cv=folds)
    return {"knn_accuracy": float(accuracy_score(labels, predicted)),
            "knn_macro_f1": float(f1_score(labels, predicted, average="macro")),
            "silhouette": float(silhouette_score(vectors, labels, metric="cosine"))}


def load(name: str, output_dir: Path):
    import anndata

    path, label_key = DATASETS[name]
    if path in BUNDLED_LABEL_KEYS:
        path = str(write_bundled_dataset(path, output_dir))
    adata = anndata.read_h5ad(path)
    labels = adata.obs[label_key].astype(str).to_numpy()
    # Types with fewer than 5 cells cannot be split into 5 stratified folds.
    names, counts = np.unique(labels, return_counts=True)
    keep = np.isin(labels, names[counts >= 5])
    return adata[keep].copy(), labels[keep]


def main(argv=None) -> dict:
    args = parse_args(argv)
    start, results = time.perf_counter(), {}
    for name in args.datasets:
        adata, labels = load(name, Path(args.output_dir))
        rows = {"PCA (50) of the HVGs (at most 2,000)": score(pca_embedding(adata), labels)}
        for folder in args.checkpoints:
            if not Path(folder).exists():
                print(f"skipping {folder}: not built (bash checkpoints/build.sh)")
                continue
            # scBERT v1 reads its whole fixed panel: no choice of tokens to score.
            v1 = json.loads((Path(folder) / "config.json").read_text())["model_type"] == "scbert"
            readings = [(0, False), (0, True)] if v1 else [(hvg, False) for hvg in args.highly_variable_genes]
            for hvg, expressed_only in readings:
                tokens = (("its panel's expressed genes" if expressed_only else "its panel") if v1
                          else f"{hvg} HVGs" if hvg else "most expressed genes")
                for pretrained in (True, False):
                    label = f"{Path(folder).name} {'pretrained' if pretrained else 'untrained'}, {tokens}"
                    vectors = embed(folder, adata, args.batch_size, pretrained, hvg, expressed_only)
                    if v1:
                        rows[label] = score(vectors, labels)
                        continue
                    hidden = vectors.shape[1] // 2  # [cells, H + H]: encoder states, then the gene-table readout
                    rows[label] = score(vectors[:, :hidden], labels)
                    rows[f"{label}, expression through the gene table"] = score(vectors[:, hidden:], labels)
        results[name] = {"cells": int(adata.n_obs), "types": int(len(set(labels))), "scores": rows}
        print(name, json.dumps(rows, indent=1))
    summary = {"results": results, "wall_seconds": time.perf_counter() - start,
               "machine": {"platform": platform.platform(), "python": platform.python_version()}}
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=2))
    lines = ["# Zero-shot cell embeddings", "",
             "10-NN (cosine) accuracy and macro-F1 in 5-fold CV, silhouette (cosine) of the known types.", ""]
    for name, result in results.items():
        lines += [f"## {name} ({result['cells']:,} cells, {result['types']} types)", "",
                  "| embedding | kNN accuracy | kNN macro-F1 | silhouette |", "|---|---|---|---|"]
        lines += [f"| {row} | {s['knn_accuracy']:.3f} | {s['knn_macro_f1']:.3f} | {s['silhouette']:.3f} |"
                  for row, s in result["scores"].items()]
        lines.append("")
    (out / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()

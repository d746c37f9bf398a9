"""Cell type annotation with a fine-tuned classifier folder, written into the AnnData the way scanpy users expect.

    scbert annotate cells.h5ad --model outputs/main/model --output annotated.h5ad
    scbert annotate filtered_feature_bc_matrix.h5 --model ... --output ...      # also a 10x folder, CSV/TSV

    adata = annotate(adata, "outputs/main/model")
    adata.obs["scbert_cell_type"], ["scbert_confidence"], ["scbert_is_novel"], ["scbert_novelty_score"]
    adata.obsm["X_scbert"], adata.uns["scbert"]

Cells are read in chunks (an .h5ad stays on disk, so a file larger than memory streams with flat memory), tokenized
by the folder's tokenizer, batched in order of length within each chunk (little padding) and run under
`torch.inference_mode`. Every input cell comes back, in the input's order: a cell that expresses fewer than
``min_genes`` vocabulary genes is "unassigned", with the reason in `obs["scbert_unassigned_reason"]`. A cell of a type
the model was not trained on is flagged by the folder's novelty detector (train/novelty.py: score, threshold and gate
chosen at fine-tuning time, in config.json); `scbert_cell_type` still names the closest known type. The cell
embedding is the vector the classification head reads (its pooling).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from train.cli import keep_freed_memory, run_command
from train.models import is_classifier
from train.novelty import detector_score_names, flag_novel, load_detector, novelty_scores
from train.readers import SUPPORTED, read_cells

UNASSIGNED = "unassigned"
# Batches of 32 cells ran the model loop 1.07x as fast as batches of 64 on 2 CPU cores, in float32 and bfloat16 alike,
# in less memory (Baron cells, 512 tokens; benchmarks/results/annotate_speed/README.md), most likely because a batch's
# feed-forward activations, 17 MB instead of 34, fit the 32 MB L3 cache.
BATCH_SIZE = 32


@torch.inference_mode()
def run_model(model, tokenizer, X: sp.csr_matrix, batch_size: int, progress=None):
    """Logits ``[cells, classes]`` and pooled embeddings ``[cells, width]`` (None for a head without them) of the
    cells x vocabulary matrix ``X``, in its row order; batches of cells of similar length."""
    cells = list(tokenizer._iter_cells(X))
    order = np.argsort(tokenizer.token_lengths(X), kind="stable")
    model.eval()
    logits, embeddings = [None] * len(cells), [None] * len(cells)
    multiple = padding_multiple(model, tokenizer)
    for start in range(0, len(cells), batch_size):
        rows = order[start:start + batch_size]
        batch = tokenizer.collate([cells[i] for i in rows], return_tensors="pt",
                                  pad_to_multiple_of=multiple).to(model.device)
        outputs = model(**batch)
        pooled = getattr(outputs, "pooled_output", None)  # scBERT v1's head returns none
        for i, row in enumerate(rows):
            logits[row] = outputs.logits[i].float().cpu().numpy()
            embeddings[row] = None if pooled is None else pooled[i].float().cpu().numpy()
        if progress is not None:
            progress.update(len(rows))
    return np.stack(logits), (None if embeddings[0] is None else np.stack(embeddings))


def padding_multiple(model, tokenizer) -> int | None:
    """32 for a bfloat16 scBERT 2.0 model, else None: on the CPU, oneDNN's bfloat16 kernels keep memory for every
    input shape they meet (measured: about 10 MB more resident memory per new sequence length, 2.8 GB after 100,000
    cells), so its batches come in at most 16 lengths; float32 needs no padding, and scBERT v1's cells are all one
    length."""
    return 32 if model.dtype == torch.bfloat16 and tokenizer.mode == "scbert2" else None


def predict_cells(model, tokenizer, adata, batch_size: int = BATCH_SIZE, gene_key: str | None = None):
    """Logits and pooled embeddings of every cell of ``adata`` (input order), and the tokenizer's match report."""
    X = tokenizer.encode_matrix(adata, gene_key=gene_key)
    return (*run_model(model, tokenizer, X, batch_size), tokenizer.last_report)


def load_classifier(folder: str | os.PathLike, device: str | None = None, min_overlap: float | None = None):
    """The fine-tuned classifier and tokenizer of ``folder``; a folder without a classification head is refused
    with the command that makes one."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    import modeling_scbert  # noqa: F401  (registers the family with the Auto classes: no remote code needed)
    from tokenization import GeneExpressionTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--model {folder} is not a model folder (no config.json there): pass the folder a "
                                "fine-tuning run saved, e.g. outputs/main/model or RUN/model.")
    config = AutoConfig.from_pretrained(folder)
    architectures = config.architectures or []
    if not is_classifier(config):
        raise ValueError(
            f"--model {folder} holds {', '.join(architectures) or 'a model'} without a cell type classification "
            f"head (a pretrained encoder). Fine-tune it on labelled cells first: scbert finetune --model {folder} "
            "--data labelled.h5ad --label_key cell_type --output_dir runs/annotator, then annotate with --model "
            "runs/annotator/model."
        )
    tokenizer_kwargs = {} if min_overlap is None else {"min_overlap": min_overlap}
    tokenizer = GeneExpressionTokenizer.from_pretrained(folder, **tokenizer_kwargs)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForSequenceClassification.from_pretrained(folder).to(device).eval()
    return model, tokenizer


@dataclass
class Annotator:
    """A loaded classifier, its tokenizer and novelty detector, and how cells are batched."""

    model: torch.nn.Module
    tokenizer: object
    source: str
    batch_size: int = BATCH_SIZE
    min_genes: int = 10
    chunk_size: int = 4096
    detector: dict = field(init=False)
    statistics: dict | None = field(init=False)

    def __post_init__(self):
        if self.min_genes < 1:
            raise ValueError(f"min_genes must be >= 1, got {self.min_genes}.")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError(f"batch_size and chunk_size must be >= 1, got {self.batch_size} and {self.chunk_size}.")
        self.detector, self.statistics = load_detector(self.model.config, self.source or None)

    def annotate_chunk(self, matrix, selector: sp.csr_matrix, progress=None) -> dict:
        """Everything written for the cells of one chunk of the input matrix (cells x input genes)."""
        X = sp.csr_matrix(matrix, dtype=np.float32)
        X.eliminate_zeros()
        has_values = np.flatnonzero(X.getnnz(axis=1) > 0)
        normalization = ""
        vocabulary = sp.csr_matrix((X.shape[0], selector.shape[1]), dtype=np.float32)
        if has_values.size:
            normalized, normalization = self.tokenizer.normalize(X[has_values])
            # [cells with values, vocabulary genes] -> [cells, vocabulary genes]: the others stay empty rows
            scatter = sp.csr_matrix((np.ones(has_values.size, dtype=np.float32), (has_values, np.arange(has_values.size))),
                                    shape=(X.shape[0], has_values.size))
            vocabulary = sp.csr_matrix(scatter @ (normalized @ selector))
        genes = vocabulary.getnnz(axis=1)
        assigned = np.flatnonzero(genes >= self.min_genes)
        result = self._empty_result(X.shape[0], genes)
        if assigned.size:
            expression = vocabulary[assigned]
            logits, embeddings = run_model(self.model, self.tokenizer, expression, self.batch_size, progress)
            self._fill(result, assigned, logits, embeddings, expression)
        if progress is not None:
            progress.update(X.shape[0] - assigned.size)
        result["normalization"] = normalization
        return result

    def _empty_result(self, n: int, genes: np.ndarray) -> dict:
        reason = np.where(genes == 0, "expresses no vocabulary gene",
                          np.char.add(genes.astype(str), f" vocabulary genes expressed (min_genes={self.min_genes})"))
        reason = np.where(genes >= self.min_genes, "", reason).astype(object)
        width = embedding_width(self.model)
        return {"cell_type": np.full(n, UNASSIGNED, dtype=object), "confidence": np.full(n, np.nan, np.float32),
                "is_novel": np.zeros(n, dtype=bool), "novelty_score": np.full(n, np.nan, np.float32),
                "unassigned_reason": reason, "genes": genes.astype(np.int32),
                "embeddings": None if width is None else np.full((n, width), np.nan, np.float32)}

    def _fill(self, result: dict, rows: np.ndarray, logits: np.ndarray, embeddings: np.ndarray | None,
              expression: sp.csr_matrix) -> None:
        probabilities = torch.softmax(torch.as_tensor(logits), dim=-1).numpy()
        id2label = self.model.config.id2label
        scores = novelty_scores(logits, embeddings, self.statistics, expression,
                                names=detector_score_names(self.detector))
        result["cell_type"][rows] = [id2label[int(i)] for i in probabilities.argmax(-1)]
        result["confidence"][rows] = probabilities.max(-1)
        result["novelty_score"][rows] = scores[self.detector["score"]]
        result["is_novel"][rows] = flag_novel(scores, self.detector)
        if embeddings is not None:
            result["embeddings"][rows] = embeddings

    def describe(self, report, normalizations: set[str], results: dict, seconds: float) -> dict:
        """What was done, for ``uns["scbert"]`` (strings and numbers only: .h5ad stores no None)."""
        report.normalization = "; ".join(sorted(n for n in normalizations if n))
        score, gate = self.detector["score"], self.detector.get("gate")
        novelty = {"score": score, "threshold": float(self.detector["thresholds"][score]),
                   "fitted_on": str(self.detector.get("fitted_on", ""))}
        if gate:
            novelty.update(gate_score=gate["score"], gate_threshold=float(gate["threshold"]))
        return {"model": self.source, "dtype": str(self.model.dtype).removeprefix("torch."),
                "gene_match": str(report), "normalization": report.normalization,
                "min_genes": self.min_genes, "cells": int(len(results["cell_type"])),
                "unassigned": int(np.sum(results["cell_type"] == UNASSIGNED)),
                "novel": int(results["is_novel"].sum()),
                "novelty": novelty,
                "seconds": float(seconds), "cells_per_second": float(len(results["cell_type"]) / max(seconds, 1e-9))}


def embedding_width(model) -> int | None:
    """The width of the pooled cell vector the classification layer reads; None for a head without one."""
    return model.classifier.in_features if hasattr(model, "pool") else None


def iterate_chunks(annotator: Annotator, matrix, n_obs: int, selector, progress=None):
    """(start, stop, result) for consecutive row chunks of ``matrix`` (in memory or an .h5ad's backed ``X``)."""
    for start in range(0, n_obs, annotator.chunk_size):
        stop = min(start + annotator.chunk_size, n_obs)
        yield start, stop, annotator.annotate_chunk(matrix[start:stop], selector, progress)


def concatenate(chunks: list[dict]) -> dict:
    merged = {key: np.concatenate([chunk[key] for chunk in chunks])
              for key in chunks[0] if key not in ("normalization", "embeddings")}
    merged["embeddings"] = None if chunks[0]["embeddings"] is None else np.concatenate([c["embeddings"] for c in chunks])
    return merged


def obs_columns(results: dict, index) -> pd.DataFrame:
    types = [t for t in dict.fromkeys(results["cell_type"]) if t != UNASSIGNED]
    categories = sorted(types) + ([UNASSIGNED] if UNASSIGNED in results["cell_type"] else [])
    return pd.DataFrame({
        "scbert_cell_type": pd.Categorical(results["cell_type"], categories=categories),
        "scbert_confidence": results["confidence"],
        "scbert_is_novel": results["is_novel"],
        "scbert_novelty_score": results["novelty_score"],
        "scbert_unassigned_reason": pd.Categorical(results["unassigned_reason"]),
        "scbert_genes": results["genes"],
    }, index=index)


def annotate(adata, model: str | os.PathLike | torch.nn.Module, tokenizer=None, batch_size: int = BATCH_SIZE,
             gene_key: str | None = None, min_genes: int = 10, chunk_size: int = 4096, device: str | None = None,
             progress: bool = False):
    """Writes the predicted type, its probability, the novelty flag and score, the embedding and what was done into
    ``adata`` (in memory or backed); returns it."""
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("Pass the tokenizer with an in-memory model (or a folder, which holds both).")
        annotator = Annotator(model, tokenizer, getattr(model, "name_or_path", ""), batch_size, min_genes, chunk_size)
    else:
        model, tokenizer = load_classifier(model, device)
        annotator = Annotator(model, tokenizer, model.name_or_path, batch_size, min_genes, chunk_size)
    from tokenization import GeneExpressionTokenizer

    start = time.perf_counter()
    selector, report = annotator.tokenizer.vocabulary_selector(GeneExpressionTokenizer._gene_names(adata, gene_key))
    annotate_in_memory(annotator, adata, selector, report, progress_bar(adata.n_obs, progress), start)
    return adata


def progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="cells", desc="annotating", file=sys.stderr)


def check_output(output: Path, overwrite: bool) -> None:
    if output.suffix != ".h5ad":
        raise ValueError(f"--output {output} must end in .h5ad: the annotated cells are written as an AnnData.")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"The output directory {output.parent} does not exist: create it first "
                                f"(mkdir -p {output.parent}).")
    if output.exists() and not overwrite:
        raise FileExistsError(f"--output {output} already exists: pass --overwrite to replace it, or another path.")


def annotate_file(path: str | os.PathLike, model: str | os.PathLike, output: str | os.PathLike, *,
                  overwrite: bool = False, genes_in_rows: bool | None = None, gene_key: str | None = None,
                  batch_size: int = BATCH_SIZE, min_genes: int = 10, chunk_size: int = 4096, device: str | None = None,
                  min_overlap: float | None = None, progress: bool = True) -> dict:
    """Annotates the cells of any supported file into ``output`` (.h5ad); returns ``uns["scbert"]`` plus the
    counts per predicted type. An .h5ad streams from disk; the output appears only once complete."""
    output = Path(output)
    check_output(output, overwrite)
    start = time.perf_counter()
    model, tokenizer = load_classifier(model, device, min_overlap)
    annotator = Annotator(model, tokenizer, model.name_or_path, batch_size, min_genes, chunk_size)
    from tokenization import GeneExpressionTokenizer

    adata = read_cells(path, lambda names: int(annotator.tokenizer._find_candidates(names)[1].astype(bool).sum()),
                       genes_in_rows)
    partial = output.with_name(output.name + ".partial")
    try:
        selector, report = annotator.tokenizer.vocabulary_selector(GeneExpressionTokenizer._gene_names(adata, gene_key))
        print(report, file=sys.stderr)
        bar = progress_bar(adata.n_obs, progress)
        if adata.isbacked:
            summary = stream_h5ad(annotator, adata, selector, report, partial, bar, start)
        else:
            annotate_in_memory(annotator, adata, selector, report, bar, start)
            adata.write_h5ad(partial)
            summary = dict(adata.uns["scbert"])
        if bar is not None:
            bar.close()
        os.replace(partial, output)
    finally:
        if adata.isbacked:
            adata.file.close()
        partial.unlink(missing_ok=True)
    return summary


def annotate_in_memory(annotator: Annotator, adata, selector, report, bar, start: float) -> None:
    chunks = [result for _, _, result in iterate_chunks(annotator, adata.X, adata.n_obs, selector, bar)]
    results = concatenate(chunks)
    for name, column in obs_columns(results, adata.obs_names).items():
        adata.obs[name] = column
    if results["embeddings"] is not None:
        adata.obsm["X_scbert"] = results["embeddings"]
    adata.uns["scbert"] = annotator.describe(report, {c["normalization"] for c in chunks}, results,
                                             time.perf_counter() - start)
    adata.uns["scbert"]["counts"] = type_counts(results)


def stream_h5ad(annotator: Annotator, adata, selector, report, partial: Path, bar, start: float) -> dict:
    """Copies the input .h5ad and writes the annotation into the copy chunk by chunk: the matrix never enters
    memory, the embeddings go straight to disk, and only the per-cell columns are held until the end."""
    import h5py
    from anndata.io import write_elem

    shutil.copyfile(adata.filename, partial)
    chunks, normalizations = [], set()
    width = embedding_width(annotator.model)
    with h5py.File(partial, "r+") as handle:
        for group in ("obsm", "uns"):
            if group not in handle:
                write_elem(handle, group, {})
        if "X_scbert" in handle["obsm"]:
            del handle["obsm"]["X_scbert"]
        embeddings = None
        if width is not None:
            embeddings = handle["obsm"].create_dataset("X_scbert", shape=(adata.n_obs, width), dtype="float32")
            embeddings.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        for begin, end, result in iterate_chunks(annotator, adata.X, adata.n_obs, selector, bar):
            if embeddings is not None:
                embeddings[begin:end] = result["embeddings"]
            result["embeddings"] = None
            normalizations.add(result.pop("normalization"))
            chunks.append(result)
        results = concatenate(chunks)
        obs = adata.obs.drop(columns=[c for c in adata.obs.columns if c.startswith("scbert_")])
        del handle["obs"]
        write_elem(handle, "obs", obs.join(obs_columns(results, obs.index)))
        summary = annotator.describe(report, normalizations, results, time.perf_counter() - start)
        summary["counts"] = type_counts(results)
        if "scbert" in handle["uns"]:
            del handle["uns"]["scbert"]
        write_elem(handle["uns"], "scbert", summary)
    return summary


def type_counts(results: dict) -> dict[str, dict[str, int]]:
    """Cells per predicted type, and how many of them are flagged novel."""
    types, counts = np.unique(results["cell_type"].astype(str), return_counts=True)
    return {str(t): {"cells": int(c), "novel": int(results["is_novel"][results["cell_type"] == t].sum())}
            for t, c in sorted(zip(types, counts), key=lambda item: -item[1])}


def print_summary(summary: dict, output: Path) -> None:
    cells = summary["cells"]
    print(f"\n{'predicted type':<28} {'cells':>8} {'share':>7} {'flagged novel':>14}")
    for name, count in summary["counts"].items():
        print(f"{name:<28} {count['cells']:>8,} {count['cells'] / cells:>7.1%} {count['novel']:>14,}")
    novelty = summary["novelty"]
    rule = f"{novelty['score']} > {novelty['threshold']:.4g}"
    if "gate_score" in novelty:
        rule += f" and {novelty['gate_score']} > {novelty['gate_threshold']:.4g}"
    print(f"\n{summary['novel']:,} of {cells:,} cells ({summary['novel'] / cells:.1%}) flagged as a type the model was "
          f"not trained on ({rule}); {summary['unassigned']:,} unassigned "
          f"(fewer than {summary['min_genes']} vocabulary genes expressed).")
    print(f"{cells:,} cells in {summary['seconds']:.1f} s ({summary['cells_per_second']:.1f} cells/s): {output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scbert annotate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help=f"the cells: {SUPPORTED}")
    parser.add_argument("--model", required=True, help="a fine-tuned classifier folder (scbert finetune's RUN/model)")
    parser.add_argument("--output", required=True, help="the annotated .h5ad to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    orientation = parser.add_mutually_exclusive_group()
    orientation.add_argument("--genes-in-rows", "--genes_in_rows", dest="genes_in_rows", action="store_true",
                             default=None, help="CSV/TSV: genes x cells (default: detected from the names)")
    orientation.add_argument("--genes-in-columns", "--genes_in_columns", dest="genes_in_rows", action="store_false",
                             help="CSV/TSV: cells x genes")
    parser.add_argument("--gene-key", "--gene_key", dest="gene_key", default=None,
                        help=".h5ad: the var column holding gene symbols or Ensembl ids (default: var_names)")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=BATCH_SIZE)
    parser.add_argument("--chunk-size", "--chunk_size", dest="chunk_size", type=int, default=4096,
                        help="cells read, tokenized and sorted by length at a time")
    parser.add_argument("--min-genes", "--min_genes", dest="min_genes", type=int, default=10,
                        help="cells expressing fewer vocabulary genes are 'unassigned' (with the reason)")
    parser.add_argument("--min-overlap", "--min_overlap", dest="min_overlap", type=float, default=None,
                        help="share of the vocabulary the input's genes must cover (default: the folder's)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--no-progress-bar", "--no_progress_bar", dest="progress", action="store_false")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    summary = annotate_file(args.input, args.model, args.output, overwrite=args.overwrite,
                            genes_in_rows=args.genes_in_rows, gene_key=args.gene_key, batch_size=args.batch_size,
                            min_genes=args.min_genes, chunk_size=args.chunk_size, device=args.device,
                            min_overlap=args.min_overlap, progress=args.progress)
    print_summary(summary, Path(args.output))
    return summary


if __name__ == "__main__":
    keep_freed_memory()  # as `scbert annotate` does: this process is the command
    run_command(main)

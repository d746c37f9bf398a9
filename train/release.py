"""Turns a pretraining run into a release folder: the model (weights in half precision when the float32 file would
exceed the size budget, and only when that leaves the held-out scores unchanged), its tokenizer, the corpus report
and a model card filled from the measured results.

    python -m train.release --run outputs/checkpoints/scbert2-small --output checkpoints/scbert2-small

Half-precision weights are stored as such, but `config.json` keeps ``dtype: float32``, so `from_pretrained` gives a
float32 model on every device (CPU training in bfloat16 is slow and lossy), exactly as a float32 release would.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModelForMaskedLM

from tokenization import GeneExpressionTokenizer
from train.cli import run_command
from train.corpus import QCSettings, build_corpus
from train.data import MaskedExpressionCollator
from train.metrics import masked_expression_metrics
from train.pretrain import split_held_out

SIZE_BUDGET_BYTES = 25 * 2**20
# A half-precision copy is released only if its held-out scores are this close to float32's.
TOLERANCE = {"masked_accuracy": 0.002, "masked_cross_entropy": 0.002, "masked_value_mse": 0.002}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.release", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a `scbert pretrain --corpus` output folder")
    parser.add_argument("--output", required=True, help="the release folder to write")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="auto: float32 within the size budget, else the half precision that keeps the scores")
    return parser.parse_args(argv)


def held_out_scores(model, tokenizer: GeneExpressionTokenizer, run_config: dict, summary: dict) -> dict[str, float]:
    """The run's held-out metrics recomputed (the same cells and masks as during pretraining)."""
    corpus = build_corpus([f["file"] for f in summary["corpus"]["files"]], QCSettings(**summary["corpus"]["qc"]),
                          run_config["max_length"], run_config["cache_dir"], log=lambda *_: None,
                          panel_genes=summary["corpus"].get("panel", {}).get("requested_genes"))
    _, held_out = split_held_out(corpus.dataset, run_config["held_out"], run_config["seed"])
    collator = MaskedExpressionCollator(tokenizer, run_config["mask_probability"], seed=run_config["seed"] + 1,
                                        zero_fraction=run_config["zero_fraction"] if tokenizer.mode == "scbert2" else 0.0,
                                        panels=corpus.panels)
    return masked_expression_metrics(Accelerator(cpu=True), model, held_out, collator,
                                     run_config["per_device_batch_size"])


def run_configuration(run: Path) -> dict:
    with open(run / "logs" / "pretrain.jsonl") as handle:
        return json.loads(handle.readline())["config"]


def choose_dtype(model, requested: str, score) -> tuple[torch.dtype, dict]:
    """The dtype to store and the held-out scores of each dtype tried."""
    fp32_bytes = sum(p.numel() * 4 for p in model.state_dict().values())
    scores = {"float32": score(model)}
    if requested == "float32" or (requested == "auto" and fp32_bytes <= SIZE_BUDGET_BYTES):
        return torch.float32, scores
    for name in (["bfloat16", "float16"] if requested == "auto" else [requested]):
        dtype = getattr(torch, name)
        rounded = type(model)(model.config)
        rounded.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})
        scores[name] = score(rounded)
        if all(abs(scores[name][k] - scores["float32"][k]) <= tol for k, tol in TOLERANCE.items() if k in scores[name]):
            return dtype, scores
    if requested != "auto":
        raise ValueError(f"{requested} changes the held-out scores beyond {TOLERANCE}: {scores}.")
    return torch.float32, scores


def describe_model(config, summary: dict) -> str:
    """The card's first sentence: architecture, size and pretraining task."""
    size = f"{summary['parameters'] / 1e6:.2f}M parameters"
    if config.model_type == "scbert":
        layers = f"{config.num_hidden_layers} layer" + ("s" if config.num_hidden_layers != 1 else "")
        return (f"scBERT v1 (Performer, {layers}, hidden {config.hidden_size}, "
                f"{config.num_attention_heads} heads, FAVOR+ with {config.nb_features} random features), {size}, "
                f"pretrained by scBERT's masked language modelling (the expression bin of 15% of the expressed "
                f"genes) on {summary['cells']:,} cells, every cell read over one fixed panel of "
                f"{config.max_seq_len - 1:,} genes (a gene a file did not measure is masked, not read as zero).")
    experts = (f", {config.num_local_experts} experts, top-{config.num_experts_per_tok}"
               if getattr(config, "num_local_experts", 0) else "")
    return (f"scBERT 2.0 ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"{config.num_attention_heads} query / {config.num_key_value_heads} key-value heads{experts}), {size}, "
            f"pretrained by masked regression (bin + value of 15% of the expressed genes) on {summary['cells']:,} "
            "cells.")


def describe_genes(corpus: dict) -> str:
    if "panel" in corpus:
        return (f"a panel of {corpus['panel']['genes']:,} highly variable human genes of the "
                f"{corpus['panel']['from_vocabulary_of']:,} symbols expressed in the corpus")
    return f"{corpus['vocabulary_size']:,} human gene symbols"


def write_card(folder: Path, name: str, summary: dict, scores: dict, dtype: torch.dtype, config) -> None:
    from huggingface_hub import ModelCard

    corpus = summary["corpus"]
    rows = "\n".join(f"| {Path(f['file']).name} | {f['species']} | {f['cells_kept']:,} of {f['cells_in']:,} | "
                     f"{f['vocabulary_genes_measured']:,} |" for f in corpus["files"])
    held = scores[str(dtype).removeprefix("torch.")]
    value_mse = f", value MSE {held['masked_value_mse']:.4f} (log2 units)" if "masked_value_mse" in held else ""
    card = f"""---
library_name: transformers
license: apache-2.0
tags: [single-cell, scRNA-seq, biology, scbert]
---
# {name}

{describe_model(config, summary)} Weights stored as {str(dtype).removeprefix("torch.")}; they load as float32.

**The corpus is small**: {corpus["cells"]:,} cells after QC from {len(corpus["files"])} files, against 30M+ for \
Geneformer or scGPT; {describe_genes(corpus)} (mouse genes map through one-to-one orthologs). Baron mouse pancreas \
and pbmc68k_reduced, the project's evaluation sets, are not in it.

| file | species | cells kept (QC) | vocabulary genes measured |
|---|---|---|---|
{rows}

Held-out {summary["held_out_cells"]:,} corpus cells (masked tokens): bin accuracy {held["masked_accuracy"]:.4f}, bin \
cross-entropy {held["masked_cross_entropy"]:.4f}{value_mse}, after {summary["steps"]:,} optimizer steps.

```python
from transformers import AutoModel, AutoTokenizer
tok = AutoTokenizer.from_pretrained("{folder}", trust_remote_code=True)
model = AutoModel.from_pretrained("{folder}", trust_remote_code=True)
```
Fine-tune: `scbert finetune --model {folder} --data cells.h5ad --label_key cell_type --output_dir runs/ft`.
"""
    ModelCard(card).save(folder / "README.md")


def main(argv=None) -> Path:
    args = parse_args(argv)
    run, output = Path(args.run), Path(args.output)
    summary = json.loads((run / "pretrain_summary.json").read_text())
    if "corpus" not in summary:
        raise ValueError(f"{run} was not pretrained with --corpus: a release folder records its corpus.")
    run_config = run_configuration(run)
    model = AutoModelForMaskedLM.from_pretrained(run / "model", dtype=torch.float32)
    tokenizer = GeneExpressionTokenizer.from_pretrained(run / "model")
    dtype, scores = choose_dtype(model, args.dtype, lambda m: held_out_scores(m, tokenizer, run_config, summary))
    shutil.rmtree(output, ignore_errors=True)
    model.to(dtype).save_pretrained(output)
    config = json.loads((output / "config.json").read_text())
    (output / "config.json").write_text(json.dumps({**config, "dtype": "float32"}, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(output)
    shutil.copy(run / "model" / "pretraining_corpus.json", output)
    release = {"architecture": run_config.get("architecture"), "stored_dtype": str(dtype).removeprefix("torch."),
               "held_out_scores": scores, "pretraining": summary}
    (output / "release.json").write_text(json.dumps(release, indent=2))
    write_card(output, output.name, summary, scores, dtype, model.config)
    print(f"Released {output} ({release['stored_dtype']}): held-out {scores}")
    return output


if __name__ == "__main__":
    run_command(main)

"""Int8 on CPU: every real option side by side on the same cells, before one is chosen for `scbert quantize`.

    python -m benchmarks.int8_options --model outputs/main/model          # a fine-tuned scBERT 2.0 classifier

Variants: the float32 model (sdpa); PyTorch's dynamic int8 `Linear` (`torch.ao.quantization.quantize_dynamic`, whose
quantized tensor types PyTorch has deprecated); torchao's dynamic int8 activations x int8 weights and its int8
weight-only `Linear` (`quantize_`, the backend of transformers' `TorchAoConfig`; layers with fewer than 16 inputs stay
float, torchao cannot pack them);
ONNX Runtime on the `torch.onnx` export, float32 and with its dynamic int8 weights (`quantize_dynamic`).

The same cells (Baron mouse pancreas, drawn at random) in the same length-sorted batches go through each variant;
the variants take turns in every round, the order rotating, so a slow spell of the shared machine hits them alike.
Reported: the median seconds per pass, the median of the per-round ratios to float32, and how often each variant's
predicted type equals float32's. Writes benchmarks/results/compression/NAME.json and .md (`--name`, default
int8_options).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.annotation_cv import BARON
from benchmarks.measure import machine_info

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "outputs" / "main" / "model"))
    parser.add_argument("--cells", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results_dir", default=str(ROOT / "benchmarks" / "results" / "compression"))
    parser.add_argument("--name", default="int8_options", help="results file names: NAME.json, .md")
    return parser.parse_args(argv)


def length_sorted_batches(tokenizer, adata, batch_size: int) -> list[dict]:
    X = tokenizer.encode_matrix(adata)
    cells = sorted(tokenizer._iter_cells(X), key=lambda cell: len(cell["gene_ids"]))
    batches = []
    for start in range(0, len(cells), batch_size):
        batch = tokenizer.collate(cells[start:start + batch_size], return_tensors="pt")
        batches.append({k: batch[k] for k in ("input_ids", "values", "attention_mask")})
    return batches


def torch_runner(model):
    @torch.inference_mode()
    def run(batch):
        return model(**batch).logits.float().numpy()
    return run


def onnx_runners(model, batches: list[dict], folder: Path, threads: int) -> dict:
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    exported = folder / "model.onnx"
    dims = {k: {0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens")} for k in batches[0]}
    torch.onnx.export(model, (), str(exported), kwargs=batches[0], input_names=list(batches[0]),
                      output_names=["logits"], dynamo=True, dynamic_shapes=dims)
    quantize_dynamic(str(exported), str(folder / "model_int8.onnx"), weight_type=QuantType.QInt8)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    runners = {}
    for name, path in (("onnxruntime float32", exported), ("onnxruntime dynamic int8", folder / "model_int8.onnx")):
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = [i.name for i in session.get_inputs()]
        runners[name] = (lambda s, n: lambda batch: s.run(None, {k: batch[k].numpy() for k in n})[0])(session, inputs)
        runners[name].bytes = path.stat().st_size
    return runners


def build_variants(folder: str, batches: list[dict], workdir: Path, threads: int) -> dict:
    from train.annotate import load_classifier

    variants = {}
    model, _ = load_classifier(folder, "cpu")
    variants["float32 (sdpa)"] = torch_runner(model)
    variants["torch dynamic int8 Linear"] = torch_runner(
        torch.ao.quantization.quantize_dynamic(load_classifier(folder, "cpu")[0], {torch.nn.Linear}, dtype=torch.qint8))
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    for name, torchao_config in (("torchao int8 x int8 (TorchAoConfig's backend)", Int8DynamicActivationInt8WeightConfig()),
                                 ("torchao int8 weight-only", Int8WeightOnlyConfig())):
        torchao_model = load_classifier(folder, "cpu")[0]
        quantize_(torchao_model, torchao_config,
                  filter_fn=lambda module, _: isinstance(module, torch.nn.Linear) and module.in_features >= 16)
        variants[name] = torch_runner(torchao_model)
    variants.update(onnx_runners(load_classifier(folder, "cpu")[0], batches, workdir, threads))
    return variants


def main(argv=None) -> dict:
    import anndata

    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from train.annotate import load_classifier

    _, tokenizer = load_classifier(args.model, "cpu")
    baron = anndata.read_h5ad(BARON)
    rows = np.sort(np.random.default_rng(0).choice(baron.n_obs, size=min(args.cells, baron.n_obs), replace=False))
    batches = length_sorted_batches(tokenizer, baron[rows].copy(), args.batch_size)
    with tempfile.TemporaryDirectory() as workdir:
        variants = build_variants(args.model, batches, Path(workdir), args.threads)
        predictions = {name: np.concatenate([run(b) for b in batches]).argmax(-1) for name, run in variants.items()}
        seconds = {name: [] for name in variants}
        names = list(variants)
        for round_index in range(args.rounds):
            for name in names[round_index % len(names):] + names[:round_index % len(names)]:
                start = time.perf_counter()
                for batch in batches:
                    variants[name](batch)
                seconds[name].append(time.perf_counter() - start)
    reference = names[0]
    n_cells = len(rows)
    results = {"model": args.model, "cells": n_cells, "batch_size": args.batch_size, "rounds": args.rounds,
               "threads": args.threads, "machine": machine_info(),
               "variants": {}}
    for name in names:
        ratios = [r / s for r, s in zip(seconds[reference], seconds[name])]
        results["variants"][name] = {
            "seconds_per_pass": seconds[name], "median_seconds": statistics.median(seconds[name]),
            "cells_per_second": n_cells / statistics.median(seconds[name]),
            "speedup_vs_float32_median": statistics.median(ratios),
            "agreement_with_float32": float(np.mean(predictions[name] == predictions[reference]))}
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    (results_dir / f"{args.name}.md").write_text(render(results))
    print(render(results))
    return results


def render(results: dict) -> str:
    lines = [f"### Int8 options on CPU: {results['cells']} Baron cells, batches of {results['batch_size']}, "
             f"{results['threads']} threads, {results['rounds']} alternating rounds", "",
             "| variant | cells/s (median) | speed-up vs float32 (median of rounds) | same type as float32 |",
             "|---|---:|---:|---:|"]
    for name, row in results["variants"].items():
        lines.append(f"| {name} | {row['cells_per_second']:.1f} | {row['speedup_vs_float32_median']:.2f}x | "
                     f"{row['agreement_with_float32']:.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

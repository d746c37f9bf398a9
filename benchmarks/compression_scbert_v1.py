"""scBERT v1 at its published shape (16,906 genes + 1, dim 200, 6 Performer layers): bytes and CPU speed of the
compressed family, built by the same functions as `scbert quantize` / `scbert distill`.

    python -m benchmarks.compression_scbert_v1              # about 10 min on 2 cores

The published weights cannot be downloaded here, and fine-tuning at 16,907 tokens is out of reach of this CPU (a
training step on one cell takes about 32 s: benchmarks/results/scbert-v1-port.json), so the models have random
weights and the inputs are random expression bins: what is measured is what does not depend on the weights,
parameters, bytes on disk and cells/s. The distilled shape is the teacher's with half its layers (`--student
distilled`), the ternary folder is the float weights exported packed (no quantization-aware training). Variants take
turns in every round, the order rotating; quoted: the median seconds per pass and the median of the per-round
ratios to float32. Writes benchmarks/results/compression/compression_scbert_v1.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

import torch

from benchmarks.compression import count_weights, time_variants
from benchmarks.measure import machine_info

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED_LENGTH = 16907  # 16,906 panglao genes + the trailing extra token


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequence_length", type=int, default=PUBLISHED_LENGTH)
    parser.add_argument("--cells", type=int, default=2, help="cells per pass (one batch)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "compression_scbert_v1"))
    parser.add_argument("--results_dir", default=str(ROOT / "benchmarks" / "results" / "compression"))
    return parser.parse_args(argv)


def build_folders(args: argparse.Namespace) -> dict[str, Path]:
    from transformers import AutoModelForSequenceClassification

    import modeling_scbert
    from train.distill import initialise_from_teacher, layer_map, student_config
    from train.quantize import full_precision_modules, quantize_int8, save_ternary, ternary_training_model

    out = Path(args.output_dir)
    config = modeling_scbert.ScBertConfig.from_preset("scbert", num_tokens=7, max_seq_len=args.sequence_length,
                                                      num_labels=13)
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_config(config).eval()
    teacher.save_pretrained(out / "float32")
    teacher = AutoModelForSequenceClassification.from_pretrained(out / "float32").eval()
    student = type(teacher)(student_config(teacher.config, "distilled"))
    initialise_from_teacher(student, teacher, layer_map(student.config.depth, teacher.config.depth))
    student.save_pretrained(out / "distilled")
    student = AutoModelForSequenceClassification.from_pretrained(out / "distilled").eval()
    quantize_int8(teacher).save_pretrained(out / "int8")
    quantize_int8(student).save_pretrained(out / "int8_distilled")
    skip = full_precision_modules(teacher, ternary=True)
    save_ternary(ternary_training_model(teacher, skip).eval(), skip, out / "ternary")
    return {"float32": out / "float32", "int8": out / "int8", "distilled": out / "distilled",
            "int8 distilled": out / "int8_distilled", "ternary": out / "ternary"}


def main(argv=None) -> dict:
    from transformers import AutoModelForSequenceClassification

    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    folders = build_folders(args)
    models = {name: AutoModelForSequenceClassification.from_pretrained(folder).eval() for name, folder in folders.items()}
    generator = torch.Generator().manual_seed(0)
    # Expression bins of a typical cell: about 90% of the panel unexpressed (bin 0).
    bins = torch.randint(1, 6, (args.cells, args.sequence_length), generator=generator)
    expressed = torch.rand(args.cells, args.sequence_length, generator=generator) < 0.1
    batch = {"input_ids": torch.where(expressed, bins, torch.zeros_like(bins))}
    with torch.inference_mode():
        for model in models.values():  # warm-up (BitLinear compiles its kernels on first use)
            model(**batch)
    seconds = time_variants(models, [batch], args.rounds)
    results = {"sequence_length": args.sequence_length, "cells_per_pass": args.cells, "rounds": args.rounds,
               "threads": args.threads, "weights": "random (speed and bytes only)",
               "machine": machine_info(), "variants": {}}
    for name, model in models.items():
        ratios = [reference / own for reference, own in zip(seconds["float32"], seconds[name])]
        results["variants"][name] = {
            "parameters": count_weights(model),
            "file_bytes": (folders[name] / "model.safetensors").stat().st_size, "seconds_per_pass": seconds[name],
            "cells_per_second": args.cells / statistics.median(seconds[name]),
            "speedup_vs_float32": statistics.median(ratios)}
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "compression_scbert_v1.json").write_text(json.dumps(results, indent=2))
    (results_dir / "compression_scbert_v1.md").write_text(render(results))
    print(render(results))
    return results


def render(results: dict) -> str:
    reference = results["variants"]["float32"]
    lines = [f"### scBERT v1 at {results['sequence_length']:,} tokens (random weights): {results['cells_per_pass']} "
             f"cells a pass, {results['threads']} threads, {results['rounds']} alternating rounds", "",
             "| variant | parameters | weights on disk | cells/s (median) | vs float32 |", "|---|---:|---:|---:|---:|"]
    for name, row in results["variants"].items():
        lines.append(f"| {name} | {row['parameters'] / 1e6:.2f}M | {row['file_bytes'] / 1e6:.1f} MB "
                     f"({row['file_bytes'] / reference['file_bytes']:.3f}x) | {row['cells_per_second']:.3f} | "
                     f"{row['speedup_vs_float32']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""The compressed family side by side on held-out Baron mouse cells: float, int8, distilled, int8 distilled, bfloat16,
bfloat16 distilled, ternary.

    python -m benchmarks.compression                       # about 30 min on 2 cores (fine-tunes the teacher first)
    python -m benchmarks.compression --teacher outputs/main/finetune/model --split outputs/main/finetune/split.json

The teacher is a scBERT 2.0 classifier fine-tuned on Baron from the shipped `checkpoints/scbert2-small` (`scbert
finetune`, its default recipe), unless --teacher names one with its split. Each variant is built by the project's
own commands (`scbert quantize --method int8|bfloat16|ternary`, `scbert distill`) on the teacher's training cells
and scored on its test cells, which none of them saw. Then every variant, in one process, runs the same test cells in
the same length-sorted batches, the variants taking turns in every round (the order rotating), so a slow spell of the
shared machine hits them alike; quoted: the median seconds per pass and the median of the per-round ratios to the float
teacher. Peak memory: each variant in a fresh process that prepares the batches, then loads the folder and runs them
once; quoted is the peak resident memory over the loading and the run (and, in brackets, how far it rose above the
process with the batches alone).
Writes benchmarks/results/compression/NAME.json, .md and .png (`--name`, default compression). `--architecture`
fine-tunes the teacher from scratch instead, e.g. scBERT v1 on the 1,000 most variable genes:

    python -m benchmarks.compression --panel 1000 --architecture scbert-small --name compression_scbert_v1_panel1000 \
        --output_dir outputs/compression_v1_panel      # about 50 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.annotation_cv import BARON
from benchmarks.measure import machine_info

ROOT = Path(__file__).resolve().parents[1]
LABEL_KEY = "cell_type1"
# A fresh process per variant: the test batches first, then the peak resident memory is reset (Linux
# /proc/self/clear_refs) and measured over loading the folder and running the batches once (VmHWM).
MEMORY_RUNNER = (
    "import json, sys, torch, warnings; warnings.filterwarnings('ignore'); "
    "from benchmarks.compression import labelled_batches, load_variant; from tokenization import GeneExpressionTokenizer; "
    "batches = labelled_batches(GeneExpressionTokenizer.from_pretrained(sys.argv[1]), *sys.argv[2:4], int(sys.argv[4]))[0]; "
    "rss = lambda key: int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) / 1024; "
    "before = rss('VmRSS'); open('/proc/self/clear_refs', 'w').write('5'); "
    "model, _ = load_variant(sys.argv[1]); torch.set_grad_enabled(False); "
    "[model(**batch).logits.sum().item() for batch in batches]; "
    "print('RESULT ' + json.dumps({'rss_before_mb': before, 'peak_rss_mb': rss('VmHWM')}))"
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(BARON))
    parser.add_argument("--label_key", default=LABEL_KEY)
    parser.add_argument("--teacher", default=None, help="a fine-tuned classifier folder (default: fine-tune one)")
    parser.add_argument("--split", default=None, help="the teacher's split.json (with --teacher)")
    parser.add_argument("--pretrained", default=str(ROOT / "checkpoints" / "scbert2-small"))
    parser.add_argument("--architecture", default=None,
                        help="fine-tune the teacher from scratch with this architecture instead (e.g. scbert-small)")
    parser.add_argument("--panel", type=int, default=0,
                        help="first keep only the data's N most variable genes (for scBERT v1, which reads every gene "
                             "of its panel: 1000 trains on this CPU); written to OUTPUT_DIR/panel_N.h5ad")
    parser.add_argument("--ternary_steps", type=int, default=800)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "compression"))
    parser.add_argument("--results_dir", default=str(ROOT / "benchmarks" / "results" / "compression"))
    parser.add_argument("--name", default="compression", help="results file names: NAME.json, .md, .png")
    parser.add_argument("command_args", nargs=argparse.REMAINDER,
                        help="after '--': flags added to every `scbert finetune|distill|quantize` run")
    return parser.parse_args(argv)


def run(command: list[str], log: Path) -> None:
    """One of the project's commands in its own process, its output in ``log``; an error names the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        status = subprocess.run([sys.executable, "-m", "train.cli", *command, "--no_progress_bar"], stdout=handle,
                                stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if status:
        raise RuntimeError(f"`scbert {' '.join(command)}` failed (status {status}); see {log}.")


def write_panel(data: str, n_genes: int, out: Path) -> str:
    """The cells restricted to their ``n_genes`` most variable genes (scanpy's Seurat flavour on log-normalised
    counts of every cell; no labels are used), as OUTPUT_DIR/panel_N.h5ad."""
    import anndata
    import scanpy as sc

    path = out / f"panel_{n_genes}.h5ad"
    if not path.is_file():
        cells = anndata.read_h5ad(data)
        logged = sc.pp.log1p(sc.pp.normalize_total(cells, target_sum=1e4, copy=True), copy=True)
        sc.pp.highly_variable_genes(logged, n_top_genes=n_genes)
        out.mkdir(parents=True, exist_ok=True)
        cells[:, logged.var["highly_variable"].to_numpy()].copy().write_h5ad(path)
    return str(path)


def build_variants(args: argparse.Namespace) -> tuple[dict[str, Path], str]:
    """The folders of every variant (built if missing) and the split they were all trained and tested on."""
    out = Path(args.output_dir)
    common = ["--data", args.data, "--label_key", args.label_key, *[a for a in args.command_args if a != "--"]]
    teacher, split = args.teacher, args.split
    if teacher is None:
        teacher, split = str(out / "teacher" / "model"), str(out / "teacher" / "split.json")
        if not Path(teacher).is_dir():
            source = ["--architecture", args.architecture] if args.architecture else ["--model", args.pretrained]
            run(["finetune", *common, *source, "--output_dir", str(out / "teacher")], out / "logs" / "teacher.log")
    if split is None:
        raise ValueError("--teacher needs --split (its split.json), so every variant is tested on unseen cells.")
    distilled = out / "distilled"
    steps = [
        ("int8", ["quantize", "--model", teacher, "--method", "int8", *common, "--split", split]),
        ("distilled", ["distill", "--teacher", teacher, *common, "--split", split]),
        ("int8 distilled", ["quantize", "--model", str(distilled / "model"), "--method", "int8", *common,
                            "--split", split]),
        ("bfloat16", ["quantize", "--model", teacher, "--method", "bfloat16", *common, "--split", split]),
        ("bfloat16 distilled", ["quantize", "--model", str(distilled / "model"), "--method", "bfloat16", *common,
                                "--split", split]),
        ("ternary", ["quantize", "--model", teacher, "--method", "ternary", *common, "--split", split,
                     "--steps", str(args.ternary_steps)]),
    ]
    folders = {"float32": Path(teacher)}
    for name, command in steps:
        target = out / name.replace(" ", "_")
        if not (target / "model" / "config.json").is_file():
            run([*command, "--output_dir", str(target)], out / "logs" / f"{name.replace(' ', '_')}.log")
        folders[name] = target / "model"
    return folders, split


def load_variant(folder: str | Path):
    from transformers import AutoModelForSequenceClassification

    import modeling_scbert  # noqa: F401  (registers the family with the Auto classes)
    from tokenization import GeneExpressionTokenizer

    return (AutoModelForSequenceClassification.from_pretrained(folder).eval(),
            GeneExpressionTokenizer.from_pretrained(folder))


def test_cells(data: str, split: str):
    import anndata

    rows = np.asarray(json.loads(Path(split).read_text())["test"], dtype=np.int64)
    return anndata.read_h5ad(data)[np.sort(rows)].copy()


def labelled_batches(tokenizer, data: str, split: str, batch_size: int, label_key: str | None = None,
                     names: list[str] | None = None):
    """The split's test cells in length-sorted batches (every variant shares the teacher's tokenizer) and, with
    ``label_key``, each one's label index in the same order."""
    cells = test_cells(data, split)
    X = tokenizer.encode_matrix(cells)
    lengths = np.diff(X.indptr)
    order = np.argsort(lengths, kind="stable")
    labels = None if label_key is None else np.asarray([names.index(name) for name in cells.obs[label_key].astype(str)])[order]
    encoded = list(tokenizer._iter_cells(X))
    batches = []
    for start in range(0, len(order), batch_size):
        batch = tokenizer.collate([encoded[i] for i in order[start:start + batch_size]], return_tensors="pt")
        batches.append({key: value for key, value in batch.items() if key != "labels"})
    return batches, labels


def peak_memory(folder: Path, data: str, split: str, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, "-c", MEMORY_RUNNER, str(folder), data, split, str(args.batch_size)]
    environment = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    output = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=environment).stdout
    line = next((line for line in output.splitlines() if line.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else {"rss_before_mb": float("nan"), "peak_rss_mb": float("nan")}


def count_weights(model) -> int:
    """Parameters, with the weights BitLinear holds packed in buffers (4 a byte) counted as the weights they are."""
    from transformers.integrations.bitnet import BitLinear

    packed = sum(module.in_features * module.out_features + (0 if module.bias is None else module.bias.numel())
                 for module in model.modules() if isinstance(module, BitLinear))
    return sum(p.numel() for p in model.parameters()) + packed


def describe(folder: Path, model) -> dict:
    report = json.loads((folder / "quantization.json").read_text()) if (folder / "quantization.json").is_file() else {}
    return {"folder": str(folder), "parameters": count_weights(model),
            "file_bytes": (folder / "model.safetensors").stat().st_size, "method": report.get("method", "float32")}


def time_variants(models: dict, batches: list[dict], rounds: int) -> dict[str, list[float]]:
    seconds = {name: [] for name in models}
    names = list(models)
    with torch.inference_mode():
        for index in range(rounds):
            for name in names[index % len(names):] + names[:index % len(names)]:
                start = time.perf_counter()
                for batch in batches:
                    models[name](**batch)
                seconds[name].append(time.perf_counter() - start)
    return seconds


def main(argv=None) -> dict:
    from train.metrics import classification_metrics

    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.panel:
        args.data = write_panel(args.data, args.panel, Path(args.output_dir))
    folders, split = build_variants(args)
    models, tokenizer = {}, None
    for name, folder in folders.items():
        models[name], loaded_tokenizer = load_variant(folder)
        tokenizer = tokenizer or loaded_tokenizer
    config = models["float32"].config
    names = [config.id2label[i] for i in range(config.num_labels)]
    batches, labels = labelled_batches(tokenizer, args.data, split, args.batch_size, args.label_key, names)
    with torch.inference_mode():  # also the warm-up pass (BitLinear compiles its kernels on first use)
        predictions = {name: np.concatenate([model(**b).logits.float().numpy() for b in batches]).argmax(-1)
                       for name, model in models.items()}
    seconds = time_variants(models, batches, args.rounds)
    results = {"data": args.data, "split": split, "model_type": config.model_type, "test_cells": int(len(labels)), "batch_size": args.batch_size,
               "rounds": args.rounds, "threads": args.threads,
               "machine": machine_info(), "variants": {}}
    for name, model in models.items():
        ratios = [reference / own for reference, own in zip(seconds["float32"], seconds[name])]
        results["variants"][name] = {
            **describe(folders[name], model), **classification_metrics(labels, predictions[name]),
            "same_type_as_float32": float(np.mean(predictions[name] == predictions["float32"])),
            "seconds_per_pass": seconds[name], "cells_per_second": len(labels) / statistics.median(seconds[name]),
            "speedup_vs_float32": statistics.median(ratios),
            **peak_memory(folders[name], args.data, split, args)}
    write_results(results, Path(args.results_dir), args.name)
    return results


def render(results: dict) -> str:
    reference = results["variants"]["float32"]
    lines = [f"### Compressed {results.get('model_type', 'scbert2')} family on {results['test_cells']} held-out cells: batches of "
             f"{results['batch_size']}, {results['threads']} threads, {results['rounds']} alternating rounds", "",
             "| variant | parameters | weights on disk | peak RSS (model + cells) | cells/s (median) | vs float32 | macro-F1 | "
             "accuracy | same type as float32 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in results["variants"].items():
        lines.append(f"| {name} | {row['parameters'] / 1e6:.2f}M | {row['file_bytes'] / 1e6:.2f} MB "
                     f"({row['file_bytes'] / reference['file_bytes']:.2f}x) | {row['peak_rss_mb']:.0f} MB (+{row['peak_rss_mb'] - row['rss_before_mb']:.0f}) | "
                     f"{row['cells_per_second']:.1f} | {row['speedup_vs_float32']:.2f}x | {row['macro_f1']:.4f} | "
                     f"{row['accuracy']:.4f} | {row['same_type_as_float32']:.1%} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    reference = variants["float32"]
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, row in variants.items():
        axis.scatter(row["speedup_vs_float32"], row["macro_f1"], s=400 * row["file_bytes"] / reference["file_bytes"],
                     alpha=0.6)
        below = name.startswith(("int8", "bfloat16"))  # these sit next to their float model
        axis.annotate(name, (row["speedup_vs_float32"], row["macro_f1"]), textcoords="offset points",
                      xytext=(-10, -16) if below else (-10, 10))
    axis.margins(x=0.15, y=0.2)
    axis.set_xlabel("cells/s vs float32 (median of rounds)")
    axis.set_ylabel("macro-F1, held-out Baron cells")
    family = {"scbert": "scBERT", "scbert2": "scBERT 2.0"}[results.get("model_type", "scbert2")]
    axis.set_title(f"Compressed {family} classifiers (marker area: bytes on disk)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(results: dict, results_dir: Path, name: str) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(results, indent=2))
    (results_dir / f"{name}.md").write_text(render(results))
    plot(results, results_dir / f"{name}.png")
    print(render(results))


if __name__ == "__main__":
    main()

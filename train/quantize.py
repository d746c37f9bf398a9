"""Quantized classifiers of the compressed family: int8 weights (Q-scBERT), bfloat16, and ternary weights
(scBERT1.58).

    scbert quantize --model runs/annotate/model --method int8 --output_dir runs/q-scbert
    scbert quantize --model runs/annotate/model --method bfloat16 --data cells.h5ad \\
        --split runs/annotate/split.json --label_key cell_type --output_dir runs/scbert-bf16
    scbert quantize --model runs/annotate/model --method ternary --data cells.h5ad \\
        --split runs/annotate/split.json --label_key cell_type --steps 300 --output_dir runs/scbert1.58

int8: transformers' `TorchAoConfig` with torchao's int8 weight-only `Linear` (`Int8WeightOnlyConfig`). Of the int8
options measured on this CPU (benchmarks/results/compression/README.md) it is the fastest that is maintained:
PyTorch's own dynamic int8 `Linear` is marginally faster but its quantized tensor types are deprecated, torchao's int8 x
int8 and ONNX Runtime are slower. The folder loads back with `from_pretrained` (the quantization config is in
config.json) from safetensors.

bfloat16: the whole model, gene table included, cast to bfloat16 and saved so (`config.json` says so, and
`from_pretrained` loads it as bfloat16): half the bytes, and faster where the hardware multiplies bfloat16 natively (a
GPU; a CPU with AVX512-BF16 or AMX, as measured in benchmarks/results/compression). Without those instructions
PyTorch converts in software and it may be slower than float32. Its cell embeddings move a little, so
with --data and --split its novelty detector is fitted again on its own embeddings of the same cells; without, the
float folder's detector is copied, and quantization.json says so.

ternary: BitNet b1.58 through transformers' BitNet integration. Quantization-aware fine-tuning first: every encoder
`Linear` becomes an `AutoBitLinear` in online mode (absmean ternary weights, per-token 8-bit absmax activations,
straight-through gradients), trained for --steps steps on real cells against the float model with `scbert distill`'s
loss (layer l's hidden state matched to the float model's layer l). Then export: each weight as {-1, 0, +1} packed 4 per
byte plus one scale per tensor, with `BitNetQuantConfig(linear_class="bitlinear", quantization_mode="offline")` in
config.json, so `from_pretrained` builds transformers' `BitLinear` layers, which unpack the weights and compute
exactly the training-time forward.

int8 and ternary keep in full precision the gene table and value embedding, the MoE router and the layer that outputs
the logits (and, for ternary, any layer whose output size is not a multiple of 4, which BitNet's packing needs).
OUTPUT_DIR/model is the folder; OUTPUT_DIR/model/quantization.json says what was converted, its bytes and how often it
agrees with the float model on real cells.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from transformers import AutoModelForSequenceClassification

from train.cli import run_command
from train.data import ClassificationCollator
from train.distill import (
    add_distillation_arguments,
    layer_field,
    load_cells,
    load_classifier_teacher,
    refit_novelty,
    train_student,
)
from train.loop import add_training_arguments, make_accelerator
from train.metrics import predict
from train.novelty import STATISTICS_FILE, save_statistics

METHODS = ("int8", "bfloat16", "ternary")
INT8_BACKENDS = ("torchao", "bitsandbytes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scbert quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a fine-tuned classifier folder (scbert finetune or distill)")
    parser.add_argument("--method", required=True, help=f"one of {METHODS}")
    parser.add_argument("--data", help="an .h5ad of real cells: the ternary fine-tuning cells (required there); for "
                                       "int8, the cells its agreement with the float model is measured on")
    parser.add_argument("--int8_backend", default="torchao",
                        help=f"one of {INT8_BACKENDS}; bitsandbytes (LLM.int8()) needs a CUDA GPU")
    parser.add_argument("--steps", type=int, default=300, help="ternary: quantization-aware fine-tuning steps")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT_DIR/model")
    add_distillation_arguments(parser)
    add_training_arguments(parser)
    parser.set_defaults(learning_rate=5e-4, ema_decay=0.0)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def full_precision_modules(model, ternary: bool) -> list[str]:
    """The module names quantization leaves alone (transformers' ``modules_to_not_convert`` patterns): the embeddings,
    the MoE router, the layer that outputs the logits (scBERT v1's head keeps its hidden layers quantized: its first
    one, panel x 512, is the model's largest matrix) and, for ternary, layers BitNet's packing cannot hold."""
    linear = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    keep = [f"{model.base_model_prefix}.embeddings", "mlp.gate"]
    keep += [name for name, module in linear.items()
             if name.startswith("classifier") and module.out_features == model.config.num_labels]
    if ternary:
        keep += [name for name, module in linear.items() if module.out_features % 4 and name not in keep]
    return keep


def quantize_int8(teacher, backend: str = "torchao"):
    """The float classifier's folder reloaded with its encoder Linear weights as int8: torchao's weight-only int8
    (CPU or GPU) through TorchAoConfig, or bitsandbytes' LLM.int8() (CUDA only) through BitsAndBytesConfig."""
    skip = full_precision_modules(teacher, False)
    if backend == "bitsandbytes":
        from transformers import BitsAndBytesConfig

        if not torch.cuda.is_available():
            raise RuntimeError("--int8_backend bitsandbytes needs a CUDA GPU (its int8 kernels run there); on the CPU "
                               "use --int8_backend torchao.")
        config, placement = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip), {"device_map": "cuda"}
    elif backend == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        config, placement = TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=skip), {}
    else:
        raise ValueError(f"Unknown --int8_backend {backend!r}: expected one of {INT8_BACKENDS}.")
    return type(teacher).from_pretrained(teacher.name_or_path, quantization_config=config, **placement).eval()


def ternary_training_model(teacher, skip: list[str]):
    """A copy of the float model whose encoder Linear layers are transformers' online `AutoBitLinear`."""
    from transformers import BitNetQuantConfig
    from transformers.integrations.bitnet import replace_with_bitnet_linear

    config = BitNetQuantConfig(linear_class="autobitlinear", quantization_mode="online", modules_to_not_convert=skip)
    model = copy.deepcopy(teacher)
    replace_with_bitnet_linear(model, modules_to_not_convert=skip, quantization_config=config)  # on the meta device
    model.load_state_dict({name: tensor.clone() for name, tensor in teacher.state_dict().items()}, assign=True)
    return model.train().requires_grad_(True)


def ternary_weights(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58's absmean quantization, as `AutoBitLinear` applies it in training: W ~ ternary / scale."""
    scale = 1.0 / weight.float().abs().mean().clamp(min=1e-5)
    return (weight.float() * scale).round().clamp(-1, 1), scale.reshape(1)


def ternary_state_dict(model) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The trained model's weights with every `AutoBitLinear` weight packed 2 bits each plus its scale."""
    from transformers.integrations.bitnet import AutoBitLinear, pack_weights

    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    converted = []
    for name, module in model.named_modules():
        if isinstance(module, AutoBitLinear):
            ternary, scale = ternary_weights(module.weight.detach())
            state[f"{name}.weight"], state[f"{name}.weight_scale"] = pack_weights(ternary), scale
            converted.append(name)
    return state, converted


def save_ternary(model, skip: list[str], folder: Path) -> list[str]:
    from transformers import BitNetQuantConfig

    state, converted = ternary_state_dict(model)
    model.config.quantization_config = BitNetQuantConfig(linear_class="bitlinear", quantization_mode="offline",
                                                         modules_to_not_convert=skip)
    model.save_pretrained(folder, state_dict=state)
    return converted


def weight_bytes(folder: Path) -> dict[str, int]:
    """Bytes of the folder's weights (file and tensors) and the part of them in the full-precision embeddings."""
    from safetensors import safe_open

    sizes = {}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        for name in weights.keys():
            tensor = weights.get_tensor(name)
            sizes[name] = tensor.numel() * tensor.element_size()
    return {"file_bytes": (folder / "model.safetensors").stat().st_size, "weights_bytes": sum(sizes.values()),
            "embedding_bytes": sum(size for name, size in sizes.items() if ".embeddings." in name)}


def agreement(accelerator, float_model, quantized, cells, tokenizer, batch_size: int) -> dict[str, float]:
    """How often the quantized model predicts the float model's type, and each one's accuracy where labels exist."""
    collate = ClassificationCollator(tokenizer)
    float_logits, labels = predict(accelerator, float_model, cells, collate, batch_size)
    quantized_logits, _ = predict(accelerator, quantized, cells, collate, batch_size)
    result = {"cells": int(len(float_logits)),
              "same_type_as_float": float(np.mean(float_logits.argmax(-1) == quantized_logits.argmax(-1)))}
    if labels is not None:
        from train.metrics import classification_metrics

        result["float"] = classification_metrics(labels, float_logits.argmax(-1))
        result["quantized"] = classification_metrics(labels, quantized_logits.argmax(-1))
    return result


def check_output(folder: Path, overwrite: bool) -> Path:
    """Where the folder is built: beside its final place, which it replaces only once complete (a crash leaves an
    existing folder as it was)."""
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists: choose another --output_dir, or pass --overwrite to replace it.")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    return partial


def move_into_place(partial: Path, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


def copy_novelty_statistics(source: Path, folder: Path) -> None:
    """The float folder's novelty detector statistics, where it has any, copied beside the new weights."""
    if (source / STATISTICS_FILE).is_file():
        shutil.copy2(source / STATISTICS_FILE, folder / STATISTICS_FILE)


def run_int8(args, teacher, tokenizer, accelerator, folder: Path) -> dict:
    cells = load_cells(args, tokenizer, teacher.config, accelerator) if args.data else None
    quantized = quantize_int8(teacher, args.int8_backend)
    quantized.save_pretrained(folder)
    if args.int8_backend == "torchao":  # bitsandbytes placed its model on the GPU already
        quantized.to(accelerator.device)
    teacher.to(accelerator.device)
    report = {"method": "int8", "backend": args.int8_backend,
              "full_precision_modules": full_precision_modules(teacher, False)}
    if cells is not None:
        report["agreement"] = agreement(accelerator, teacher, quantized, cells.get("test", cells["train"]), tokenizer,
                                        args.per_device_batch_size)
    copy_novelty_statistics(Path(args.model), folder)  # int8 leaves the embeddings the detector reads as they were
    return report


def run_bfloat16(args, teacher, tokenizer, accelerator, folder: Path) -> dict:
    cells = load_cells(args, tokenizer, teacher.config, accelerator) if args.data else None
    model = copy.deepcopy(teacher).to(device=accelerator.device, dtype=torch.bfloat16).eval()
    novelty = None if cells is None else refit_novelty(accelerator, model, cells, tokenizer, args.data, args)
    model.save_pretrained(folder)
    if novelty is not None:
        save_statistics(novelty["statistics"], folder)
    else:
        copy_novelty_statistics(Path(args.model), folder)
    report = {"method": "bfloat16", "backend": "torch bfloat16, every module",
              "novelty_detector": "refitted on its own embeddings" if novelty else "copied from the float folder"}
    if cells is not None:
        teacher.to(accelerator.device)
        report["agreement"] = agreement(accelerator, teacher, model, cells.get("test", cells["train"]), tokenizer,
                                        args.per_device_batch_size)
    return report


def run_ternary(args, teacher, tokenizer, accelerator, folder: Path) -> dict:
    if not args.data:
        raise ValueError("--method ternary fine-tunes on real cells: give --data (and, to stop early and score, "
                         "--split with --label_key).")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}.")
    args.max_steps = args.steps
    skip = full_precision_modules(teacher, True)
    model = ternary_training_model(teacher, skip)
    cells = load_cells(args, tokenizer, teacher.config, accelerator)
    layers = getattr(teacher.config, layer_field(teacher.config))
    summary = train_student(model, teacher, tokenizer, cells, args, accelerator, list(range(layers)))
    model = accelerator.unwrap_model(model).eval()
    model.config.novelty_detection = None
    novelty = refit_novelty(accelerator, model, cells, tokenizer, args.data, args)
    converted = save_ternary(model, skip, folder)
    if novelty is not None:
        save_statistics(novelty["statistics"], folder)
    evaluated = cells.get("test", cells["train"])
    loaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    return {"method": "ternary", "backend": "transformers BitNet: AutoBitLinear (online) training, BitLinear (offline) "
            "packed weights", "steps": summary["steps"], "train_seconds": summary["train_seconds"],
            "converted_modules": len(converted), "full_precision_modules": skip,
            "training": {k: v for k, v in summary.items() if k not in ("student", "teacher")},
            "agreement": agreement(accelerator, teacher, loaded, evaluated, tokenizer, args.per_device_batch_size)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    folder = Path(args.output_dir) / "model"
    if args.method not in METHODS:
        raise ValueError(f"Unknown --method {args.method!r}: expected one of {METHODS}.")
    partial = check_output(folder, args.overwrite)
    accelerator = make_accelerator(args, "quantize")
    set_seed(args.seed)
    teacher, tokenizer = load_classifier_teacher(args.model, args)
    run = {"int8": run_int8, "bfloat16": run_bfloat16, "ternary": run_ternary}[args.method]
    report = run(args, teacher, tokenizer, accelerator, partial)
    tokenizer.save_pretrained(partial)
    report |= {"source": args.model, **weight_bytes(partial), "float_bytes": weight_bytes(Path(args.model))}
    (partial / "quantization.json").write_text(json.dumps(report, indent=2))
    move_into_place(partial, folder)
    print_report(report, folder)
    accelerator.end_training()
    return report


def print_report(report: dict, folder: Path) -> None:
    kept = ("cast to bfloat16 too" if report["method"] == "bfloat16" else "kept in full precision") + (
        ": scBERT 2.0's gene table and value embedding, v1's bin embeddings and gene positions")
    print(f"{report['method']}: {report['weights_bytes']:,} weight bytes ({report['weights_bytes'] / report['float_bytes']['weights_bytes']:.3f}x "
          f"the float folder's {report['float_bytes']['weights_bytes']:,}; {report['embedding_bytes'] / report['weights_bytes']:.0%} "
          f"of them the embeddings, {kept})")
    if "agreement" in report:
        agreement_ = report["agreement"]
        line = f"same type as the float model on {agreement_['same_type_as_float']:.1%} of {agreement_['cells']:,} cells"
        if "quantized" in agreement_:
            line += (f"; macro-F1 {agreement_['quantized']['macro_f1']:.4f} vs float {agreement_['float']['macro_f1']:.4f}")
        print(line)
    print(f"model folder: {folder} (AutoModelForSequenceClassification.from_pretrained(folder))")


if __name__ == "__main__":
    run_command(main)

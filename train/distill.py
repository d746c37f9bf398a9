"""Distillation: a smaller scBERT family classifier trained on a fine-tuned teacher's outputs (distilled scBERT).

    scbert distill --teacher runs/annotate/model --data cells.h5ad --output_dir runs/distilled
    scbert distill --teacher runs/annotate/model --data cells.h5ad --split runs/annotate/split.json \\
        --label_key cell_type --student num_hidden_layers=2 --output_dir runs/distilled

The student is the teacher's architecture with fewer layers (`--student distilled`: half of them), or any other
override of the teacher's config (`KEY=VALUE,...` or a config.json); it reads the teacher's tokens and predicts its
classes. Its layers start from evenly spaced teacher layers, the first and the last among them, and it is trained, through
the training loop's loss hook, on

    T^2 * KL(teacher || student, both at temperature T)                       the teacher's soft class outputs
    + hidden_weight * mean_l |h_student(l) - h_teacher(map(l))|^2 / |h_teacher(map(l))|^2   hidden-state matching
    + label_weight * cross-entropy(student, true type)                        when --label_key gives the labels

on real cells: any cells, labelled or not, as the teacher labels them. With the teacher's `split.json` (written by
`scbert finetune`) the student trains on its training cells, stops early on its validation cells (balanced log-loss
to the true labels) and is scored next to the teacher on its test cells; its novelty detector is then refitted on the
same cells. OUTPUT_DIR/model is the student's Hub-ready folder, OUTPUT_DIR/results.json what was measured.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from transformers.modeling_outputs import ModelOutput

import modeling_scbert
from train.cli import run_command
from train.data import ClassificationCollator, load_tokenized_dataset, make_loader
from train.loop import EarlyStopping, add_training_arguments, make_accelerator, train_loop
from train.metrics import classification_metrics, predict, validation_metrics
from train.models import is_classifier, load_pretrained_folder, parse_overrides, save_model_folder, tokenizer_overrides
from train.novelty import save_statistics

# The student keeps what ties it to the teacher's tokens and classes.
FIXED_FIELDS = ("vocab_size", "num_bins", "num_tokens", "max_seq_len", "num_labels", "id2label", "label2id", "model_type")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scbert distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="a fine-tuned classifier folder (scbert finetune)")
    parser.add_argument("--data", required=True, help="an .h5ad of real cells to distil on (labels not needed)")
    add_distillation_arguments(parser)
    parser.add_argument("--student", default="distilled",
                        help="'distilled' (the teacher with half its layers), a config.json, or KEY=VALUE[,KEY=VALUE] "
                             "overrides of the teacher's config (e.g. num_hidden_layers=2,intermediate_size=256)")
    add_training_arguments(parser)
    parser.set_defaults(num_epochs=20, learning_rate=1e-3, ema_decay=0.995)
    return parser


def add_distillation_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of training against a teacher, shared with `scbert quantize --method ternary`."""
    parser.add_argument("--split", help="the teacher's split.json: train on its training cells, stop early on its "
                                        "validation cells, score on its test cells (needs --label_key)")
    parser.add_argument("--label_key", help="obs column with the cell types (the teacher's label names)")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--hidden_weight", type=float, default=1.0, help="weight of the hidden-state matching")
    parser.add_argument("--label_weight", type=float, default=0.5, help="weight of the cross-entropy to the labels")
    parser.add_argument("--class_sampling", choices=["none", "balanced"], default="balanced",
                        help="balanced (with --label_key): every epoch draws each type equally often, as `scbert "
                             "finetune` does, so the few cells of a rare type are not drowned out")
    parser.add_argument("--gene_dropout", type=float, default=0.3,
                        help="augmentation: share of each training cell's genes dropped (teacher and student see "
                             "the same cell)")
    parser.add_argument("--patience", type=int, default=6, help="epochs without validation improvement")
    parser.add_argument("--novelty_false_flag_rate", type=float, default=0.02)


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def load_classifier_teacher(folder: str, args: argparse.Namespace):
    """The frozen teacher (eval mode) and its tokenizer; a clear error for a folder that is not a classifier."""
    config, tokenizer = load_pretrained_folder(folder, **tokenizer_overrides(args))
    if not is_classifier(config):
        raise ValueError(f"{folder} holds a {config.architectures} model: distillation matches a classifier's class "
                         "outputs, so the teacher must be a fine-tuned classifier folder (`scbert finetune`).")
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(f"{folder} is already quantized ({config.quantization_config['quant_method']}): use the "
                         "float folder it was made from.")
    stored = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    if stored != "float32":
        raise ValueError(f"{folder} is stored as {stored}: use the float32 folder it was made from.")
    teacher = getattr(modeling_scbert, config.architectures[0]).from_pretrained(folder)
    return teacher.eval().requires_grad_(False), tokenizer


def layer_field(config) -> str:
    return "depth" if config.model_type == "scbert" else "num_hidden_layers"


def hidden_field(config) -> str:
    return "dim" if config.model_type == "scbert" else "hidden_size"


def student_config(teacher_config, spec: str):
    """The teacher's config with the student's overrides (see --student)."""
    layers = getattr(teacher_config, layer_field(teacher_config))
    overrides = {layer_field(teacher_config): max(1, layers // 2)} if spec == "distilled" else parse_overrides(spec, "--student takes 'distilled', a config.json or")
    config = copy.deepcopy(teacher_config)
    for key, value in overrides.items():
        if key in FIXED_FIELDS:
            raise ValueError(f"--student cannot change {key!r}: the student reads the teacher's tokens and predicts "
                             "its classes.")
        if not hasattr(config, key):
            raise ValueError(f"--student: {key!r} is not a field of the teacher's {config.model_type} config.")
        setattr(config, key, value)
    if getattr(config, layer_field(config)) > layers:
        raise ValueError(f"--student has {getattr(config, layer_field(config))} layers, more than the teacher's {layers}.")
    config.novelty_detection = None  # the teacher's detector does not describe the student's embeddings
    return config


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Evenly spaced teacher layers from the first to the last: 4 -> 2 gives [0, 3]; a single layer takes the last.
    The first stays first because it is the layer that reads the embeddings: a student starting from [1, 3] began
    with 15% validation accuracy on Baron, from [0, 3] with 91%."""
    if student_layers == 1:
        return [teacher_layers - 1]
    return np.linspace(0, teacher_layers - 1, student_layers).round().astype(int).tolist()


def initialise_from_teacher(student, teacher, mapping: list[int]) -> int:
    """Copies every teacher tensor of the same name and shape into the student, student layer l from teacher layer
    mapping[l]; returns how many tensors were copied."""
    prefix = f"{teacher.base_model_prefix}.layers."
    source = teacher.state_dict()
    copied = {}
    for key, value in student.state_dict().items():
        teacher_key = key
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            teacher_key = f"{prefix}{mapping[int(index)]}.{rest}"
        if teacher_key in source and source[teacher_key].shape == value.shape:
            copied[key] = source[teacher_key].clone()
    student.load_state_dict(copied, strict=False)
    return len(copied)


@dataclass
class DistillationOutput(ModelOutput):
    loss: torch.Tensor | None = None
    soft_loss: torch.Tensor | None = None
    hidden_loss: torch.Tensor | None = None
    label_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class DistillationLoss:
    """The loop's ``compute_loss`` for a student against a frozen teacher (the formula in the module docstring).
    ``mapping[l]`` is the teacher layer whose output student layer l matches; None matches no hidden states."""

    def __init__(self, teacher, mapping: list[int] | None, temperature: float, hidden_weight: float,
                 label_weight: float):
        if temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {temperature}.")
        self.teacher, self.mapping, self.temperature = teacher, mapping, temperature
        self.hidden_weight = hidden_weight if mapping is not None else 0.0
        self.label_weight = label_weight

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, DistillationOutput]:
        labels = batch.get("labels")
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        with_hidden = self.hidden_weight > 0
        with torch.no_grad():
            target = self.teacher(**inputs, output_hidden_states=with_hidden)
        outputs = model(**inputs, output_hidden_states=with_hidden)
        t = self.temperature
        soft = F.kl_div(F.log_softmax(outputs.logits.float() / t, -1), F.log_softmax(target.logits.float() / t, -1),
                        log_target=True, reduction="batchmean") * t * t
        parts = {"soft_loss": soft}
        if with_hidden:
            parts["hidden_loss"] = self.hidden_weight * self.hidden_mismatch(outputs.hidden_states, target.hidden_states,
                                                                             inputs.get("attention_mask"))
        if labels is not None and self.label_weight > 0:
            parts["label_loss"] = self.label_weight * F.cross_entropy(outputs.logits.float(), labels)
        loss = sum(parts.values())
        return loss, DistillationOutput(loss=loss, logits=outputs.logits, **parts)

    def hidden_mismatch(self, student_states, teacher_states, attention_mask) -> torch.Tensor:
        """Mean over matched layers of the squared error relative to the teacher state's squared norm (the residual
        stream's scale grows by orders of magnitude from layer to layer), over real tokens only."""
        mask = None if attention_mask is None else attention_mask.unsqueeze(-1).float()  # [batch, tokens, 1]
        losses = []
        for student_index, teacher_index in enumerate(self.mapping):
            s, t = student_states[student_index + 1].float(), teacher_states[teacher_index + 1].float()
            error, scale = (s - t).pow(2), t.pow(2)
            if mask is not None:
                error, scale = error * mask, scale * mask
            losses.append(error.sum() / scale.sum().clamp_min(1e-12))
        return torch.stack(losses).mean()


def load_cells(args: argparse.Namespace, tokenizer, teacher_config, accelerator) -> dict:
    """The tokenized cells by part: the teacher's split (train/validation/test) or every cell for training."""
    names = [teacher_config.id2label[i] for i in range(teacher_config.num_labels)]
    if args.split and not args.label_key:
        raise ValueError("--split scores the student on labelled cells: give --label_key too.")
    with accelerator.main_process_first():
        dataset = load_tokenized_dataset([args.data], tokenizer, label_key=args.label_key, cache_dir=args.cache_dir,
                                         label_names=names if args.label_key else None)
    if not args.split:
        return {"train": dataset}
    split = {part: np.asarray(rows, dtype=np.int64) for part, rows in json.loads(Path(args.split).read_text()).items()}
    missing = sorted({"train", "validation", "test"} - set(split))
    if missing:
        raise ValueError(f"{args.split} has no {missing} rows: expected the split.json `scbert finetune` writes.")
    largest = max(int(rows.max(initial=-1)) for rows in split.values())
    if largest >= len(dataset):
        raise ValueError(f"{args.split} indexes cell {largest}, but {args.data} has {len(dataset)} cells: pass the "
                         "data the teacher was fine-tuned on.")
    return {part: dataset.select(rows) for part, rows in split.items()} | {"rows": split}


def train_student(student, teacher, tokenizer, cells: dict, args: argparse.Namespace, accelerator,
                  mapping: list[int] | None) -> dict:
    """Trains ``student`` on the teacher (early stopping on the validation cells when there are any; the best
    weights are kept in memory and restored) and returns what was measured."""
    teacher.to(accelerator.device)
    compute_loss = DistillationLoss(teacher, mapping, args.temperature, args.hidden_weight, args.label_weight)
    collate = ClassificationCollator(tokenizer, packed=args.packed)
    train_collate = ClassificationCollator(tokenizer, gene_dropout=args.gene_dropout, seed=args.seed, packed=args.packed)
    sample_weights = None
    if args.class_sampling == "balanced" and "label" in cells["train"].column_names:
        labels = np.asarray(cells["train"]["label"])
        sample_weights = 1.0 / np.bincount(labels)[labels]
    train_loader = make_loader(cells["train"], train_collate, args.per_device_batch_size, True, args.seed,
                               args.num_workers, sample_weights)
    evaluate = early_stopping = None
    best_state = {}
    if "validation" in cells:
        def evaluate(model) -> dict[str, float]:
            return validation_metrics(accelerator, model, cells["validation"], collate, args.per_device_batch_size)

        def keep(best):
            best_state["weights"] = {k: v.detach().clone() for k, v in accelerator.unwrap_model(best).state_dict().items()}

        early_stopping = EarlyStopping("balanced_log_loss", greater_is_better=False, patience=args.patience,
                                       on_new_best=keep)
    result = train_loop(accelerator, student, train_loader, args, compute_loss=compute_loss, evaluate=evaluate,
                        early_stopping=early_stopping)
    student = accelerator.unwrap_model(student)
    if best_state:
        student.load_state_dict(best_state["weights"])
    summary = {"train_seconds": result.seconds, "steps": result.step, "epoch_kept": result.best_epoch,
               "best_validation_balanced_log_loss": result.best_metric}
    if "test" in cells:
        names = [student.config.id2label[i] for i in range(student.config.num_labels)]
        for name, model in (("student", student), ("teacher", teacher)):
            logits, y = predict(accelerator, model, cells["test"], collate, args.per_device_batch_size)
            summary[name] = classification_metrics(y, logits.argmax(-1), names)
    return summary


def refit_novelty(accelerator, model, cells: dict, tokenizer, adata_path: str, args) -> dict | None:
    """The student's own open-set detector, fitted on the teacher's training and validation cells as `scbert
    finetune` fits one; None without a split (the folder then flags by scBERT's max-probability rule)."""
    if "validation" not in cells:
        return None
    from train.data import read_h5ad
    from train.finetune import fit_novelty

    expression = tokenizer.encode_matrix(read_h5ad(adata_path))  # [cells, vocabulary genes], log2
    collate = ClassificationCollator(tokenizer, packed=args.packed)
    detector, statistics = fit_novelty(accelerator, model, cells, collate, cells["rows"], expression, tokenizer, args)
    return {"detector": detector, "statistics": statistics}


def count_parameters(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = make_accelerator(args, "distill")
    set_seed(args.seed)
    teacher, tokenizer = load_classifier_teacher(args.teacher, args)
    config = student_config(teacher.config, args.student)
    same_width = getattr(config, hidden_field(config)) == getattr(teacher.config, hidden_field(config))
    if args.hidden_weight > 0 and not same_width:
        raise ValueError(f"Hidden-state matching compares the student's states with the teacher's, so the student "
                         f"keeps {hidden_field(config)}={getattr(teacher.config, hidden_field(config))}; narrow its "
                         "intermediate size instead, or pass --hidden_weight 0.")
    student = type(teacher)(config)
    mapping = layer_map(getattr(config, layer_field(config)), getattr(teacher.config, layer_field(config)))
    copied = initialise_from_teacher(student, teacher, mapping)
    cells = load_cells(args, tokenizer, teacher.config, accelerator)
    summary = train_student(student, teacher, tokenizer, cells, args, accelerator, mapping)
    student = accelerator.unwrap_model(student)
    novelty = refit_novelty(accelerator, student, cells, tokenizer, args.data, args)
    output = Path(args.output_dir) / "model"
    save_model_folder(student, tokenizer, output, accelerator)
    results = {"teacher": args.teacher, "data": args.data, "student_overrides": args.student,
               "layer_map": mapping, "tensors_from_teacher": copied,
               "parameters": {"student": count_parameters(student), "teacher": count_parameters(teacher)},
               "loss": {"temperature": args.temperature, "hidden_weight": args.hidden_weight,
                        "label_weight": args.label_weight if args.label_key else 0.0}, **summary}
    if accelerator.is_main_process:
        if novelty is not None:
            save_statistics(novelty["statistics"], output)
            results["novelty_detection"] = novelty["detector"]
        (Path(args.output_dir) / "results.json").write_text(json.dumps(results, indent=2))
        print_summary(results, output)
    accelerator.end_training()
    return results


def print_summary(results: dict, output: Path) -> None:
    params = results["parameters"]
    print(f"student: {params['student']:,} parameters ({params['student'] / params['teacher']:.2f}x the teacher's "
          f"{params['teacher']:,}), layers from teacher layers {results['layer_map']}")
    if "student" in results:
        for name in ("teacher", "student"):
            print(f"{name:<8} test accuracy {results[name]['accuracy']:.4f}  macro-F1 {results[name]['macro_f1']:.4f}")
    print(f"model folder: {output}")


if __name__ == "__main__":
    run_command(main)

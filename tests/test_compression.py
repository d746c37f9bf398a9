"""The compressed family: `scbert quantize --method int8|bfloat16|ternary` and `scbert distill`, on a tiny classifier
fine-tuned on real Baron cells (conftest's `tiny_classifier`), plus the same code path on scBERT v1 and the MoE model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

import modeling_scbert
from tokenization import GeneExpressionTokenizer
from train import distill, quantize
from train.distill import DistillationLoss, initialise_from_teacher, layer_map, student_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tiny_classifier) -> Path:
    return tiny_classifier.parent  # holds split.json next to model/


@pytest.fixture(scope="module")
def data_path(tiny_classifier) -> Path:
    return tiny_classifier.parents[1] / "labelled.h5ad"


@pytest.fixture(scope="module")
def teacher(tiny_classifier):
    return AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()


@pytest.fixture(scope="module")
def batch(tiny_classifier, classifier_cells) -> dict:
    tokenizer = GeneExpressionTokenizer.from_pretrained(tiny_classifier)
    encoded = tokenizer(classifier_cells[:24], return_tensors="pt")
    return {key: encoded[key] for key in ("input_ids", "values", "attention_mask")}


def training_args(run_dir: Path, data_path: Path, output: Path, *extra: str) -> list[str]:
    return ["--data", str(data_path), "--label_key", "cell_type1", "--split", str(run_dir / "split.json"),
            "--output_dir", str(output), "--cache_dir", str(output.parent / "cache"), "--num_workers", "0",
            "--no_progress_bar", *extra]


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_state():
    """Each command builds its own Accelerator, a process-wide singleton."""
    reset_accelerate()
    yield
    reset_accelerate()


def run_quietly(main, argv):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reset_accelerate()
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)
        reset_accelerate()


# ------------------------------------------------------------------------------------------------------------- int8

def quantized_folder(method: str, tiny_classifier, run_dir, data_path, tmp_path_factory, *extra: str):
    """`scbert quantize --method METHOD` run on the tiny classifier: its folder and report."""
    output = tmp_path_factory.mktemp(method) / "run"
    report = run_quietly(quantize.main, ["--model", str(tiny_classifier), "--method", method, *extra,
                                         *training_args(run_dir, data_path, output)])
    return output / "model", report


@pytest.fixture(scope="module")
def int8_folder(tiny_classifier, run_dir, data_path, tmp_path_factory) -> tuple[Path, dict]:
    return quantized_folder("int8", tiny_classifier, run_dir, data_path, tmp_path_factory)


def test_int8_folder_loads_quantized_and_predicts_as_in_memory(int8_folder, teacher, batch):
    from torchao.quantization import Int8Tensor

    folder, report = int8_folder
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "torchao"
    loaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    layer = loaded.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.weight, Int8Tensor) and isinstance(layer.mlp.down_proj.weight, Int8Tensor)
    assert not isinstance(loaded.classifier.weight, Int8Tensor)  # the head and the gene table stay float
    assert loaded.model.embeddings.gene_embeddings.weight.dtype == torch.float32
    in_memory = quantize.quantize_int8(teacher)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, in_memory(**batch).logits, rtol=0, atol=0)
        # int8 weights move the logits a little, not the answer (bar: 95% of the real test cells agree)
        assert (loaded(**batch).logits - teacher(**batch).logits).abs().max() < 0.5
    assert report["agreement"]["same_type_as_float"] >= 0.95
    assert report["weights_bytes"] < report["float_bytes"]["weights_bytes"]


def test_int8_folder_loads_as_remote_code_in_a_fresh_interpreter(int8_folder, batch, remote_code_predictions):
    folder, _ = int8_folder
    name, logits = remote_code_predictions(folder, batch, "AutoModelForSequenceClassification", "logits")
    assert name.endswith("modeling_scbert2.ScBert2ForSequenceClassification")  # the folder's copy of the code
    assert not name.startswith("modeling_scbert.")
    loaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        np.testing.assert_allclose(logits, loaded(**batch).logits.numpy(), atol=1e-5)


def test_ternary_folder_loads_as_remote_code_in_a_fresh_interpreter(ternary_folder, batch, remote_code_predictions):
    folder, _ = ternary_folder
    name, logits = remote_code_predictions(folder, batch, "AutoModelForSequenceClassification", "logits")
    assert name.endswith("modeling_scbert2.ScBert2ForSequenceClassification") and not name.startswith("modeling_")
    loaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        np.testing.assert_allclose(logits, loaded(**batch).logits.numpy(), atol=1e-5)


# --------------------------------------------------------------------------------------------------------- bfloat16

@pytest.fixture(scope="module")
def bfloat16_folder(tiny_classifier, run_dir, data_path, tmp_path_factory) -> tuple[Path, dict]:
    return quantized_folder("bfloat16", tiny_classifier, run_dir, data_path, tmp_path_factory)


def test_bfloat16_folder_loads_as_bfloat16_and_predicts_as_the_cast_model(bfloat16_folder, teacher, batch):
    folder, report = bfloat16_folder
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    loaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.bfloat16}
    cast = AutoModelForSequenceClassification.from_pretrained(teacher.name_or_path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, cast(**batch).logits, rtol=0, atol=0)
        assert (loaded(**batch).logits.float() - teacher(**batch).logits).abs().max() < 0.5
    assert report["agreement"]["same_type_as_float"] >= 0.95
    assert 0.45 < report["weights_bytes"] / report["float_bytes"]["weights_bytes"] < 0.55
    # refitted on its own embeddings: a detector of the same kind, its statistics beside the weights
    assert report["novelty_detector"] == "refitted on its own embeddings"
    assert config["novelty_detection"]["score"] == teacher.config.novelty_detection["score"]
    assert (folder / "novelty.safetensors").is_file()


def test_a_bfloat16_folder_is_refused_as_a_source(bfloat16_folder, tmp_path):
    with pytest.raises(ValueError, match="is stored as bfloat16: use the float32 folder it was made from"):
        quantize.main(["--model", str(bfloat16_folder[0]), "--method", "int8", "--output_dir", str(tmp_path / "run")])


# ---------------------------------------------------------------------------------------------------------- ternary

def test_ternary_weights_are_absmean_ternary():
    weight = torch.randn(8, 16)
    ternary, scale = quantize.ternary_weights(weight)
    assert set(ternary.unique().tolist()) <= {-1.0, 0.0, 1.0}
    torch.testing.assert_close(scale, 1 / weight.abs().mean().reshape(1))
    torch.testing.assert_close(ternary, (weight * scale).round().clamp(-1, 1))


@pytest.mark.parametrize("shape", [(4, 3), (64, 32), (128, 7)])
def test_packing_is_lossless(shape):
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    ternary = torch.randint(-1, 2, shape).float()
    packed = pack_weights(ternary.clone())
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0] // 4, shape[1])  # 4 weights a byte
    torch.testing.assert_close(unpack_weights(packed, dtype=torch.float32), ternary, rtol=0, atol=0)


def tiny_models() -> dict:
    """The three families of the code path, randomly initialised: scBERT 2.0 dense and MoE, and scBERT v1."""
    labels = {"num_labels": 3}
    pooled = {"pooling": "mean"}
    dense = modeling_scbert.ScBert2Config.from_preset("scbert2-tiny", vocab_size=40, **pooled, **labels)
    moe = modeling_scbert.ScBert2Config.from_preset("scbert2-tiny", vocab_size=40, num_local_experts=8, **pooled, **labels)
    v1 = modeling_scbert.ScBertConfig.from_preset("scbert-small", num_tokens=7, max_seq_len=31, **labels)
    torch.manual_seed(0)
    return {name: AutoModelForSequenceClassification.from_config(config).eval()
            for name, config in (("scbert2", dense), ("scbert2-moe", moe), ("scbert", v1))}


def tiny_inputs(model) -> dict:
    generator = torch.Generator().manual_seed(0)
    if model.config.model_type == "scbert":
        return {"input_ids": torch.randint(0, 7, (3, 31), generator=generator)}
    ids = torch.randint(4, 40, (3, 12), generator=generator)
    return {"input_ids": ids, "values": torch.rand(3, 12, generator=generator) * 4,
            "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("family", ["scbert2", "scbert2-moe", "scbert"])
def test_ternary_folder_equals_the_training_time_forward(family, tmp_path):
    """Save (packed) and load (transformers' BitLinear): the same outputs as the AutoBitLinear model it was trained as."""
    from transformers.integrations.bitnet import AutoBitLinear, BitLinear

    model = tiny_models()[family]
    skip = quantize.full_precision_modules(model, ternary=True)
    training = quantize.ternary_training_model(model, skip).eval()
    assert any(isinstance(module, AutoBitLinear) for module in training.modules())
    inputs = tiny_inputs(model)
    with torch.no_grad():
        expected = training(**inputs).logits
    converted = quantize.save_ternary(training, skip, tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    bit_layers = {name for name, module in loaded.named_modules() if isinstance(module, BitLinear)}
    assert bit_layers == set(converted) and bit_layers
    logits_layer = "classifier.fc3" if family == "scbert" else "classifier"
    assert isinstance(loaded.get_submodule(logits_layer), torch.nn.Linear)  # the logits and the router stay float
    assert not any(name.endswith("mlp.gate") for name in bit_layers)
    if family == "scbert":
        assert {"classifier.fc1", "classifier.fc2"} <= bit_layers
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=1e-4, atol=1e-4)


def test_bitlinear_forward_is_the_bitnet_formula(tmp_path):
    """y = (round(x * s_x) clamped to int8) @ W_ternary^T / (s_x * s_W), with s_x = 127 / max|x| per token."""
    from transformers.integrations.bitnet import BitLinear, unpack_weights

    model = tiny_models()["scbert2"]
    skip = quantize.full_precision_modules(model, ternary=True)
    quantize.save_ternary(quantize.ternary_training_model(model, skip), skip, tmp_path)
    layer = AutoModelForSequenceClassification.from_pretrained(tmp_path).model.layers[0].mlp.up_proj
    assert isinstance(layer, BitLinear)
    x = torch.randn(2, 5, layer.in_features)
    weight = unpack_weights(layer.weight, dtype=torch.float32)
    assert set(weight.unique().tolist()) <= {-1.0, 0.0, 1.0}
    s_x = 127 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    expected = (x * s_x).round().clamp(-128, 127) @ weight.T / (s_x * layer.weight_scale)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ternary_folder(tiny_classifier, run_dir, data_path, tmp_path_factory) -> tuple[Path, dict]:
    return quantized_folder("ternary", tiny_classifier, run_dir, data_path, tmp_path_factory, "--steps", "4")


def test_ternary_command_writes_a_packed_folder(ternary_folder):
    from transformers.integrations.bitnet import BitLinear

    folder, report = ternary_folder
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitnet"
    assert config["quantization_config"]["linear_class"] == "bitlinear"
    loaded = AutoModelForSequenceClassification.from_pretrained(folder)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, BitLinear)
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8
    assert report["steps"] == 4 and report["converted_modules"] > 0
    assert 0.0 <= report["agreement"]["same_type_as_float"] <= 1.0
    assert (folder / "novelty.safetensors").is_file() and config["novelty_detection"] is not None


@pytest.mark.parametrize("variant", ["int8", "bfloat16", "ternary"])
def test_annotate_takes_a_quantized_folder(variant, int8_folder, bfloat16_folder, ternary_folder, tiny_classifier,
                                           classifier_cells):
    from train.annotate import annotate

    folder = {"int8": int8_folder, "bfloat16": bfloat16_folder, "ternary": ternary_folder}[variant][0]
    quantized = annotate(classifier_cells.copy(), folder)
    reference = annotate(classifier_cells.copy(), tiny_classifier)
    assert quantized.uns["scbert"]["model"] == str(folder)
    assert quantized.uns["scbert"]["dtype"] == ("bfloat16" if variant == "bfloat16" else "float32")
    agreement = np.mean(quantized.obs["scbert_cell_type"].to_numpy() == reference.obs["scbert_cell_type"].to_numpy())
    assert agreement >= (0.5 if variant == "ternary" else 0.95)  # 4 ternary training steps: agreement, not parity
    assert quantized.obsm["X_scbert"].shape == reference.obsm["X_scbert"].shape
    assert quantized.obsm["X_scbert"].dtype == reference.obsm["X_scbert"].dtype


# ------------------------------------------------------------------------------------------------------ distillation

def test_layer_map_spreads_teacher_layers_from_the_first_to_the_last():
    assert layer_map(2, 4) == [0, 3]
    assert layer_map(3, 6) == [0, 2, 5]
    assert layer_map(1, 2) == [1]
    assert layer_map(4, 4) == [0, 1, 2, 3]


@pytest.mark.parametrize("family", ["scbert2", "scbert2-moe", "scbert"])
def test_student_starts_from_the_mapped_teacher_layers(family):
    teacher = tiny_models()[family]
    config = student_config(teacher.config, "distilled")
    field = "depth" if family == "scbert" else "num_hidden_layers"
    assert getattr(config, field) == getattr(teacher.config, field) // 2
    student = type(teacher)(config)
    mapping = layer_map(getattr(config, field), getattr(teacher.config, field))
    initialise_from_teacher(student, teacher, mapping)
    prefix = teacher.base_model_prefix
    for name, tensor in student.state_dict().items():
        source = name
        if name.startswith(f"{prefix}.layers."):
            index, rest = name[len(prefix) + 8:].split(".", 1)
            source = f"{prefix}.layers.{mapping[int(index)]}.{rest}"
        torch.testing.assert_close(tensor, teacher.state_dict()[source], rtol=0, atol=0)


def test_distillation_loss_is_zero_for_a_copy_of_the_teacher(teacher, batch):
    loss_fn = DistillationLoss(teacher, [0, 1], temperature=2.0, hidden_weight=1.0, label_weight=0.0)
    student = AutoModelForSequenceClassification.from_pretrained(teacher.name_or_path).eval()
    loss, outputs = loss_fn(student, dict(batch))
    assert outputs.soft_loss.abs() < 1e-6 and outputs.hidden_loss.abs() < 1e-6 and loss.abs() < 1e-6
    torch.manual_seed(0)
    for weight in student.model.layers[1].parameters():  # a visible change: scaling one matrix can be lost in noise
        weight.data.add_(0.1 * torch.randn_like(weight))
    loss, outputs = loss_fn(student, dict(batch))
    assert outputs.hidden_loss > 0 and outputs.soft_loss > 0


def test_distill_command_trains_a_smaller_student(tiny_classifier, run_dir, data_path, tmp_path):
    output = tmp_path / "run"
    results = run_quietly(distill.main, ["--teacher", str(tiny_classifier), "--student", "num_hidden_layers=1",
                                         "--max_steps", "6", *training_args(run_dir, data_path, output)])
    student = AutoModelForSequenceClassification.from_pretrained(output / "model")
    assert student.config.num_hidden_layers == 1 and len(student.model.layers) == 1
    assert results["parameters"]["student"] < results["parameters"]["teacher"]
    assert results["layer_map"] == [1] and results["steps"] == 6
    assert set(results["student"]) >= {"accuracy", "macro_f1"} and set(results["teacher"]) >= {"macro_f1"}
    assert (output / "model" / "novelty.safetensors").is_file()
    assert json.loads((output / "results.json").read_text())["tensors_from_teacher"] > 0


# --------------------------------------------------------------------------------------------------------- bad input

def test_unknown_method_is_refused(tiny_classifier, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown --method 'int4'.*\('int8', 'bfloat16', 'ternary'\)"):
        quantize.main(["--model", str(tiny_classifier), "--method", "int4", "--output_dir", str(tmp_path)])


@pytest.mark.parametrize("command", ["quantize", "distill"])
def test_a_folder_without_a_classifier_head_is_refused(command, tmp_path):
    pretrained = str(ROOT / "checkpoints" / "scbert2-small")
    argv = (["--model", pretrained, "--method", "int8"] if command == "quantize"
            else ["--teacher", pretrained, "--data", "unused.h5ad"])
    main = quantize.main if command == "quantize" else distill.main
    with pytest.raises(ValueError, match="must be a fine-tuned classifier folder"):
        main([*argv, "--output_dir", str(tmp_path / "run")])


def test_an_already_quantized_folder_is_refused(int8_folder, tmp_path):
    with pytest.raises(ValueError, match="already quantized \\(torchao\\): use the float folder"):
        quantize.main(["--model", str(int8_folder[0]), "--method", "int8", "--output_dir", str(tmp_path / "run")])


def test_an_existing_output_is_kept_without_overwrite(tiny_classifier, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists: choose another --output_dir, or pass --overwrite"):
        quantize.main(["--model", str(tiny_classifier), "--method", "int8", "--output_dir", str(tmp_path)])
    assert (tmp_path / "model" / "keep.txt").read_text() == "mine"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_bitsandbytes_without_a_gpu_is_refused(teacher):
    with pytest.raises(RuntimeError, match="bitsandbytes needs a CUDA GPU .* use --int8_backend torchao"):
        quantize.quantize_int8(teacher, "bitsandbytes")
    with pytest.raises(ValueError, match="Unknown --int8_backend 'onnx'"):
        quantize.quantize_int8(teacher, "onnx")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' LLM.int8() kernels need a CUDA GPU")
def test_bitsandbytes_int8_folder_loads_back(teacher, batch, tmp_path):
    pytest.importorskip("bitsandbytes")
    quantized = quantize.quantize_int8(teacher, "bitsandbytes")
    quantized.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, device_map="cuda").eval()
    on_gpu = {key: value.cuda() for key, value in batch.items()}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**on_gpu).logits, quantized(**on_gpu).logits)


def test_ternary_needs_cells_and_a_failed_overwrite_keeps_the_old_folder(tiny_classifier, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="--method ternary fine-tunes on real cells: give --data"):
        quantize.main(["--model", str(tiny_classifier), "--method", "ternary", "--output_dir", str(tmp_path),
                       "--overwrite"])
    assert (tmp_path / "model" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("spec, message", [
    ("num_labels=5", "cannot change 'num_labels'"),
    ("no_such_field=1", "'no_such_field' is not a field"),
    ("num_hidden_layers=9", "9 layers, more than the teacher's 2"),
    ("num_hidden_layers", "takes 'distilled', a config.json or KEY=VALUE pairs"),
])
def test_bad_student_specifications(teacher, spec, message):
    with pytest.raises(ValueError, match=message):
        student_config(teacher.config, spec)


def test_a_narrower_student_needs_hidden_weight_zero(tiny_classifier, data_path, tmp_path):
    with pytest.raises(ValueError, match="keeps hidden_size=32; narrow its intermediate size instead, or pass "
                                         "--hidden_weight 0"):
        distill.main(["--teacher", str(tiny_classifier), "--data", str(data_path), "--student", "hidden_size=16",
                      "--output_dir", str(tmp_path / "run")])


def test_split_problems_are_named(tiny_classifier, run_dir, data_path, tmp_path):
    base = ["--teacher", str(tiny_classifier), "--data", str(data_path), "--output_dir", str(tmp_path / "run"),
            "--cache_dir", str(tmp_path / "cache")]
    with pytest.raises(ValueError, match="--split scores the student on labelled cells: give --label_key"):
        distill.main([*base, "--split", str(run_dir / "split.json")])
    split = json.loads((run_dir / "split.json").read_text())
    split["test"] = [10_000]
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match="indexes cell 10000, but .* has 120 cells"):
        distill.main([*base, "--split", str(tmp_path / "split.json"), "--label_key", "cell_type1"])


# ------------------------------------------------------------------------------- scBERT v1 through the same commands

@pytest.fixture(scope="module")
def v1_run(classifier_cells, tmp_path_factory) -> Path:
    """scBERT v1 (`scbert-small`, Performer) fine-tuned for a few steps on the 300-gene real cells: its panel is
    the data's genes, so this is v1 at a panel a CPU trains in seconds."""
    from train import finetune

    folder = tmp_path_factory.mktemp("v1")
    classifier_cells.write_h5ad(folder / "labelled.h5ad")
    run_quietly(finetune.main, ["--data", str(folder / "labelled.h5ad"), "--label_key", "cell_type1", "--architecture",
                                "scbert-small", "--max_steps", "4", "--output_dir", str(folder / "run"), "--cache_dir",
                                str(folder / "cache"), "--no_baseline", "--num_workers", "0", "--no_progress_bar"])
    return folder


@pytest.mark.parametrize("command", ["distill", "int8", "ternary"])
def test_scbert_v1_classifier_goes_through_the_same_commands(command, v1_run, tmp_path):
    teacher_folder = v1_run / "run" / "model"
    common = training_args(v1_run / "run", v1_run / "labelled.h5ad", tmp_path / "run")
    if command == "distill":
        results = run_quietly(distill.main, ["--teacher", str(teacher_folder), "--max_steps", "2", *common])
        assert results["parameters"]["student"] < results["parameters"]["teacher"]
    else:
        extra = ["--steps", "2"] if command == "ternary" else []
        report = run_quietly(quantize.main, ["--model", str(teacher_folder), "--method", command, *extra, *common])
        assert report["weights_bytes"] < report["float_bytes"]["weights_bytes"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model").eval()
    assert model.config.model_type == "scbert"
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, 7, (2, model.config.max_seq_len))).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()

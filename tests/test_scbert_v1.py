"""The original scBERT as transformers models: parity with performer-pytorch 1.0.6, conversion, save/load, behaviour.

Parity is the acceptance test: a `PerformerLM` built as scBERT's pretrain.py builds it is saved in the published
checkpoint layout, converted, and must give the same logits. performer-pytorch 1.0.6 from pip has no
`Gene2VecPositionalEmbedding` (scBERT's vendored copy adds it); with `rotary_position_emb=False` it builds an
`AbsolutePositionalEmbedding` whose `emb` is an `nn.Embedding` under the same key (`pos_emb.emb.weight`) and the same
forward (`emb(arange(seq_len))`), so replacing that embedding by a frozen float64 table with a trailing zero row
reproduces scBERT's gene2vec module exactly.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

import modeling_scbert  # noqa: F401  (registers the Auto classes)
from modeling_scbert.configuration_scbert import PRESETS, ScBertConfig
from modeling_scbert.convert_scbert_original_checkpoint import convert_checkpoint, main
from modeling_scbert.modeling_scbert import ScBertForMaskedLM, ScBertForSequenceClassification, ScBertModel

NUM_GENES = 200
SMALL = dict(dim=32, depth=2, heads=4, dim_head=16)  # nb_features = int(16 * ln 16) = 44 in performer-pytorch
SMALL_CONFIG = dict(**SMALL, max_seq_len=NUM_GENES + 1, nb_features=44, classifier_fc1_size=16, classifier_fc2_size=8)
PARITY_ATOL = 1e-5

# performer-pytorch 1.0.6 itself calls the deprecated torch.qr.
pytestmark = pytest.mark.filterwarnings("ignore:torch.qr is deprecated:UserWarning")


# ------------------------------------------------------------------------------------------------ original model
def build_original(num_genes, dim, depth, heads, dim_head=64, qkv_bias=False, seed=0):
    """scBERT's pretrain.py model (num_tokens = bin_num + 2 = 7, local_attn_heads = 0, gene2vec positions)."""
    performer_pytorch = pytest.importorskip("performer_pytorch", reason="parity needs performer-pytorch 1.0.6")
    torch.manual_seed(seed)
    model = performer_pytorch.PerformerLM(
        num_tokens=7, dim=dim, depth=depth, max_seq_len=num_genes + 1, heads=heads, dim_head=dim_head,
        local_attn_heads=0, rotary_position_emb=False, qkv_bias=qkv_bias,
    )
    # Gene2VecPositionalEmbedding: float64 gene2vec rows plus a zero row for the extra token, frozen.
    gene2vec = torch.randn(num_genes, dim, dtype=torch.float64)
    model.pos_emb.emb = nn.Embedding.from_pretrained(torch.cat([gene2vec, torch.zeros(1, dim, dtype=torch.float64)]))
    return model.eval()


class FinetuneHead(nn.Module):
    """scBERT finetune.py's `Identity` head, structure unchanged (SEQ_LEN and the conv width made arguments)."""

    def __init__(self, seq_len, dim, dropout=0.0, h_dim=100, out_dim=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, (1, dim))
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(in_features=seq_len, out_features=512, bias=True)
        self.act1 = nn.ReLU()
        self.dropout1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(in_features=512, out_features=h_dim, bias=True)
        self.act2 = nn.ReLU()
        self.dropout2 = nn.Dropout(dropout)
        self.fc3 = nn.Linear(in_features=h_dim, out_features=out_dim, bias=True)

    def forward(self, x):
        x = x[:, None, :, :]
        x = self.act(self.conv1(x))
        x = x.view(x.shape[0], -1)
        x = self.dropout1(self.act1(self.fc1(x)))
        x = self.dropout2(self.act2(self.fc2(x)))
        return self.fc3(x)


def save_published(model, path, prefix=""):
    """The published layout: {"model_state_dict": ...} from model.module (gene2vec stays float64)."""
    state_dict = {prefix + key: value for key, value in model.state_dict().items()}
    assert state_dict[prefix + "pos_emb.emb.weight"].dtype == torch.float64
    torch.save({"model_state_dict": state_dict}, path)
    return path


def random_cell(num_genes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 6, (1, num_genes + 1), generator=generator)


def small_model(model_class=ScBertForMaskedLM, **overrides):
    torch.manual_seed(0)
    return model_class(ScBertConfig(**{**SMALL_CONFIG, **overrides})).eval()


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_parity_small(tmp_path, qkv_bias):
    original = build_original(NUM_GENES, **SMALL, qkv_bias=qkv_bias)
    checkpoint = save_published(original, tmp_path / "pretrain.pth")
    convert_checkpoint(checkpoint, tmp_path / "hf")
    converted = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()

    assert isinstance(converted, ScBertForMaskedLM)
    assert (converted.config.depth, converted.config.heads, converted.config.dim_head) == (2, 4, 16)
    assert converted.config.nb_features == 44 and converted.config.qkv_bias == qkv_bias
    cell = random_cell(NUM_GENES)
    with torch.no_grad():
        torch.testing.assert_close(converted(cell).logits, original(cell), atol=PARITY_ATOL, rtol=0)
        torch.testing.assert_close(
            converted.scbert(cell).last_hidden_state, original(cell, return_encodings=True), atol=PARITY_ATOL, rtol=0
        )


@pytest.mark.slow
def test_parity_full_size(tmp_path):
    """The published size: 16,906 genes + 1, dim 200, depth 6, 10 heads of 64, 266 random features."""
    original = build_original(16906, dim=200, depth=6, heads=10)
    checkpoint = save_published(original, tmp_path / "panglao_pretrain.pth")
    converted = convert_checkpoint(checkpoint, tmp_path / "hf")

    default = ScBertConfig()
    for field in ("num_tokens", "dim", "depth", "heads", "dim_head", "max_seq_len", "nb_features", "ff_mult"):
        assert getattr(converted.config, field) == getattr(default, field), field
    cell = random_cell(16906)
    with torch.no_grad():
        torch.testing.assert_close(converted(cell).logits, original(cell), atol=PARITY_ATOL, rtol=0)


def test_finetuned_checkpoint_gives_conv_classifier(tmp_path):
    original = build_original(NUM_GENES, **SMALL)
    original.to_out = FinetuneHead(NUM_GENES + 1, SMALL["dim"], h_dim=128, out_dim=5).eval()
    checkpoint = save_published(original, tmp_path / "finetuned.pth", prefix="module.")
    convert_checkpoint(checkpoint, tmp_path / "hf")
    converted = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()

    assert isinstance(converted, ScBertForSequenceClassification)
    config = converted.config
    assert (config.classifier_type, config.num_labels) == ("conv", 5)
    assert (config.classifier_fc1_size, config.classifier_fc2_size) == (512, 128)
    cell = random_cell(NUM_GENES, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(converted(cell).logits, original(cell), atol=PARITY_ATOL, rtol=0)


def test_command_line_with_gene_list(tmp_path):
    pytest.importorskip("tokenization", reason="the tokenizer package is needed to write the tokenizer")
    from tokenization import GeneExpressionTokenizer

    checkpoint = save_published(build_original(NUM_GENES, **SMALL), tmp_path / "pretrain.pth")
    genes = [f"GENE{i}" for i in range(NUM_GENES)]
    gene_list = tmp_path / "genes.txt"
    gene_list.write_text("\n".join(genes) + "\n")
    main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "hf"), "--gene-list", str(gene_list)])

    tokenizer = GeneExpressionTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.mode == "scbert" and tokenizer.genes == genes
    assert tokenizer.sequence_length == AutoConfig.from_pretrained(tmp_path / "hf").max_seq_len


# ------------------------------------------------------------------------------------------------ converter errors
def test_converter_rejects_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="Checkpoint not found"):
        convert_checkpoint(tmp_path / "absent.pth", tmp_path / "hf")


@pytest.mark.parametrize("content", [{"state_dict": {}}, torch.zeros(3)], ids=["wrong-key", "not-a-dict"])
def test_converter_rejects_other_files(tmp_path, content):
    torch.save(content, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="expected a dict with a 'model_state_dict' entry"):
        convert_checkpoint(tmp_path / "other.pth", tmp_path / "hf")


def test_converter_rejects_unreadable_files(tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="Could not read .* as a torch checkpoint"):
        convert_checkpoint(tmp_path / "notes.pth", tmp_path / "hf")


def _corrupt(state_dict, case):
    if case == "no-projection":
        del state_dict["performer.net.layers.0.0.fn.fast_attention.projection_matrix"]
    elif case == "ragged-heads":
        state_dict["performer.net.layers.0.0.fn.to_q.weight"] = torch.zeros(60, 32)
    elif case == "mismatched-layer":
        state_dict["performer.net.layers.1.1.fn.fn.w1.weight"] = torch.zeros(64, 32)
    elif case == "foreign-key":
        state_dict["performer.net.layers.0.0.fn.local_attn.rel_pos.weights"] = torch.zeros(3)
    elif case == "no-positions":
        del state_dict["pos_emb.emb.weight"]
    return state_dict


@pytest.mark.parametrize(
    "case, message",
    [
        ("no-projection", "missing 'performer.net.layers.0.0.fn.fast_attention.projection_matrix'"),
        ("ragged-heads", "attention width 60 is not a multiple of dim_head 16"),
        ("mismatched-layer", "Shapes do not form an scBERT"),
        ("foreign-key", "Unexpected key 'performer.net.layers.0.0.fn.local_attn"),
        ("no-positions", "Cannot infer max_seq_len"),
    ],
)
def test_converter_rejects_non_scbert_shapes(tmp_path, case, message):
    state_dict = _corrupt(build_original(NUM_GENES, **SMALL).state_dict(), case)
    torch.save({"model_state_dict": state_dict}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(tmp_path / "bad.pth", tmp_path / "hf")


def test_converter_rejects_wrong_gene_list(tmp_path):
    checkpoint = save_published(build_original(NUM_GENES, **SMALL), tmp_path / "pretrain.pth")
    (tmp_path / "genes.txt").write_text("A\nB\nC\n")
    with pytest.raises(ValueError, match="gene list has 3 genes but the checkpoint has 200"):
        convert_checkpoint(checkpoint, tmp_path / "hf", tmp_path / "genes.txt")
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize(
    "model_class, auto_class",
    [
        (ScBertModel, AutoModel),
        (ScBertForMaskedLM, AutoModelForMaskedLM),
        (ScBertForSequenceClassification, AutoModelForSequenceClassification),
    ],
)
def test_auto_round_trip_is_exact(tmp_path, model_class, auto_class):
    model = small_model(model_class, num_labels=3)
    model.load_gene2vec(torch.randn(NUM_GENES, SMALL["dim"]))
    model.base_model.calls_since_last_redraw.fill_(7)
    model.save_pretrained(tmp_path)
    loaded = auto_class.from_pretrained(tmp_path).eval()

    assert type(loaded) is model_class
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    # The weights are bit-identical; the outputs only to rounding, because loaded tensors can sit at unaligned
    # offsets of the safetensors file, which changes the summation order of CPU matrix kernels.
    cell = random_cell(NUM_GENES)
    with torch.no_grad():
        torch.testing.assert_close(model(cell)[0], loaded(cell)[0], atol=1e-6, rtol=0)


def test_classifier_from_pretrained_encoder_keeps_its_weights(tmp_path):
    """Fine-tuning starts from the MLM checkpoint: the new head is initialised, the encoder (random features and
    gene2vec included) is loaded untouched."""
    pretrained = small_model(ScBertForMaskedLM)
    pretrained.load_gene2vec(torch.randn(NUM_GENES, SMALL["dim"]))
    pretrained.save_pretrained(tmp_path)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=4)

    assert classifier.classifier.fc3.out_features == 4
    expected = pretrained.scbert.state_dict()
    for key, value in classifier.scbert.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_load_gene2vec_appends_the_extra_token_row():
    model = small_model(ScBertModel)
    table = torch.randn(NUM_GENES, SMALL["dim"]).numpy()
    model.load_gene2vec(table)
    positions = model.embeddings.position_embeddings
    assert torch.equal(positions[:NUM_GENES], torch.from_numpy(table))
    assert not positions[NUM_GENES].any()
    assert "embeddings.position_embeddings" not in dict(model.named_parameters())
    with pytest.raises(ValueError, match=r"gene2vec table must be \[201, 32\] or \[200, 32\]"):
        model.load_gene2vec(torch.zeros(5, SMALL["dim"]))


@pytest.mark.parametrize("initializer_range", [None, 0.02])
def test_initialisation_is_performer_pytorchs_unless_a_range_is_given(initializer_range):
    torch.manual_seed(0)
    model = ScBertForSequenceClassification(ScBertConfig(**SMALL_CONFIG, num_labels=3, initializer_range=initializer_range))
    bins = model.scbert.embeddings.token_embeddings.weight
    fc1 = model.classifier.fc1
    if initializer_range is None:  # nn.Embedding's normal(0, 1), nn.Linear's uniform(+-1/sqrt(fan_in)) with bias
        assert 0.8 < bins.std() < 1.2
        assert fc1.weight.abs().max() <= fc1.in_features**-0.5 and fc1.bias.abs().max() > 0
        assert 0.8 < model.scbert.embeddings.position_embeddings.std() < 1.2
    else:
        assert 0.015 < bins.std() < 0.025 and 0.015 < fc1.weight.std() < 0.025
        assert not fc1.bias.any()


# ------------------------------------------------------------------------------------------------ behaviour
def test_features_redraw_in_training_only():
    model = small_model(ScBertModel, feature_redraw_interval=2)
    cell = random_cell(NUM_GENES)
    projection = model.layers[0].attention.projection_matrix
    with torch.no_grad():
        first = model(cell).last_hidden_state
        assert torch.equal(model(cell).last_hidden_state, first)  # eval: deterministic, nothing counted
        assert model.calls_since_last_redraw == 0

        model.train()
        before = [layer.attention.projection_matrix.clone() for layer in model.layers]
        model(cell)
        model(cell)
        assert model.calls_since_last_redraw == 2 and torch.equal(projection, before[0])
        model(cell)  # the call after `feature_redraw_interval` counted calls redraws every layer
        assert model.calls_since_last_redraw == 0
        for layer, old in zip(model.layers, before):
            assert not torch.equal(layer.attention.projection_matrix, old)

        model.eval()
        redrawn = model(cell).last_hidden_state
        assert not torch.equal(redrawn, first)
        assert torch.equal(model(cell).last_hidden_state, redrawn)


def test_fixed_features_never_redraw():
    model = small_model(ScBertModel, feature_redraw_interval=None).train()
    before = model.layers[0].attention.projection_matrix.clone()
    with torch.no_grad():
        for _ in range(3):
            model(random_cell(NUM_GENES))
    assert torch.equal(model.layers[0].attention.projection_matrix, before)


def test_attention_mask_removes_padded_keys():
    model = small_model(ScBertModel)
    cell = random_cell(NUM_GENES)
    length = NUM_GENES - 20
    short = cell[:, :length]
    padded = torch.cat([short, torch.full((1, 5), 6)], dim=1)
    other_padding = torch.cat([short, torch.randint(0, 6, (1, 5))], dim=1)
    mask = torch.cat([torch.ones(1, length), torch.zeros(1, 5)], dim=1).long()
    with torch.no_grad():
        reference = model(short).last_hidden_state
        masked = model(padded, attention_mask=mask).last_hidden_state[:, :length]
        masked_other = model(other_padding, attention_mask=mask).last_hidden_state[:, :length]
        unmasked = model(padded).last_hidden_state[:, :length]
        assert torch.equal(model(cell, attention_mask=torch.ones_like(cell)).last_hidden_state, model(cell)[0])
    torch.testing.assert_close(masked, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(masked_other, masked, atol=1e-5, rtol=0)
    assert not torch.allclose(unmasked, reference, atol=1e-3)


def test_pooled_head_ignores_padding():
    model = small_model(ScBertForSequenceClassification, classifier_type="pooled", num_labels=4)
    short = random_cell(NUM_GENES)[:, :100]
    padded = torch.cat([short, torch.randint(0, 6, (1, 7))], dim=1)
    mask = torch.cat([torch.ones(1, 100), torch.zeros(1, 7)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(
            model(padded, attention_mask=mask).logits, model(short).logits, atol=1e-5, rtol=0
        )


def test_tokenizer_extras_are_ignored_and_outputs_have_the_documented_shapes():
    model = small_model(ScBertForMaskedLM)
    batch = torch.cat([random_cell(NUM_GENES, seed) for seed in range(2)])
    extras = {"values": torch.rand(batch.shape), "bin_ids": batch.clone()}
    with torch.no_grad():
        out = model(input_ids=batch, attention_mask=torch.ones_like(batch), output_hidden_states=True, **extras)
        as_tuple = model(batch, return_dict=False)
    assert out.logits.shape == (2, NUM_GENES + 1, 7)
    assert len(out.hidden_states) == SMALL["depth"] + 1
    assert torch.equal(as_tuple[0], out.logits)


def test_model_takes_the_tokenizer_output():
    pytest.importorskip("tokenization", reason="needs the project's tokenizer package")
    from tokenization import GeneExpressionTokenizer

    genes = [f"GENE{i}" for i in range(NUM_GENES)]
    tokenizer = GeneExpressionTokenizer(genes=genes, mode="scbert")
    counts = torch.poisson(torch.full((3, NUM_GENES), 2.0)).numpy()
    batch = tokenizer(counts, gene_names=genes, return_tensors="pt")
    with torch.no_grad():
        logits = small_model(ScBertForMaskedLM)(**batch).logits
    assert logits.shape == (3, NUM_GENES + 1, 7)


def test_invalid_inputs_have_clear_errors():
    model = small_model(ScBertForSequenceClassification, num_labels=3)
    cell = random_cell(NUM_GENES)
    with pytest.raises(ValueError, match="scBERT takes bin tokens, not gene ids"):
        model(cell + 10)
    with pytest.raises(ValueError, match="model holds 201 positions"):
        model(torch.zeros(1, NUM_GENES + 5, dtype=torch.long))
    with pytest.raises(ValueError, match='classifier_type="conv" needs the full panel of 201 tokens, got 100'):
        model(cell[:, :100])


def test_mlm_loss_ignores_unlabelled_positions_and_gradients_flow():
    model = small_model(ScBertForMaskedLM, feature_redraw_interval=None).train()
    cell = random_cell(NUM_GENES)
    labels = torch.full_like(cell, -100)
    labels[:, ::10] = cell[:, ::10]
    out = model(cell, labels=labels)
    expected = F.cross_entropy(out.logits[0, ::10], cell[0, ::10])
    torch.testing.assert_close(out.loss, expected)

    out.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_gradient_checkpointing_matches_plain_backward():
    model = small_model(ScBertForMaskedLM, feature_redraw_interval=None).train()
    cell = random_cell(NUM_GENES)
    model(cell, labels=cell).loss.backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(cell, labels=cell).loss.backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, plain[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "num_labels, problem_type, labels, expected_loss",
    [
        (3, None, torch.tensor([0, 2]), "cross_entropy"),
        (1, None, torch.tensor([0.5, -1.0]), "mse"),
        (3, "multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), "bce"),
    ],
)
def test_classification_losses_follow_problem_type(num_labels, problem_type, labels, expected_loss):
    model = small_model(
        ScBertForSequenceClassification, num_labels=num_labels, problem_type=problem_type, classifier_type="pooled"
    )
    batch = torch.cat([random_cell(NUM_GENES, seed) for seed in range(2)])
    out = model(batch, labels=labels)
    losses = {
        "cross_entropy": lambda: F.cross_entropy(out.logits, labels),
        "mse": lambda: F.mse_loss(out.logits.squeeze(), labels),
        "bce": lambda: F.binary_cross_entropy_with_logits(out.logits, labels),
    }
    assert out.logits.shape == (2, num_labels)
    torch.testing.assert_close(out.loss, losses[expected_loss]())


# ------------------------------------------------------------------------------------------------ config
def test_config_defaults_are_the_published_scbert():
    config = ScBertConfig()
    assert (config.num_tokens, config.dim, config.depth, config.heads, config.dim_head) == (7, 200, 6, 10, 64)
    assert (config.max_seq_len, config.nb_features, config.feature_redraw_interval) == (16907, 266, 1000)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (200, 6, 10)
    assert config.model_type == "scbert" and config.classifier_type == "conv"


# `@strict` names the field (or, for a check across fields, the validator) before the reason.
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dim": 0}, r"field 'dim':\s+ValueError: Value must be a positive integer, got 0"),
        ({"heads": -2}, r"field 'heads':\s+ValueError: Value must be a positive integer"),
        ({"dim": True}, r"field 'dim':\s+TypeError: Field 'dim' expected int, got bool"),
        ({"max_seq_len": 3.5}, r"field 'max_seq_len':\s+TypeError: Field 'max_seq_len' expected int, got float"),
        ({"feature_redraw_interval": 0}, r"field 'feature_redraw_interval':\s+ValueError: .*positive integer or None"),
        ({"attn_dropout": 1.5}, r"field 'attn_dropout':\s+ValueError: .*must be in \[0, 1\), got 1.5"),
        ({"layer_norm_eps": 0.0}, r"field 'layer_norm_eps':\s+ValueError: Value must be a finite number > 0"),
        ({"initializer_range": -0.1}, r"field 'initializer_range':\s+ValueError: .*finite number >= 0 or None"),
        ({"classifier_type": "cls"}, r"field 'classifier_type':\s+TypeError: .*expected one of \('conv', 'pooled'\)"),
        ({"mask_token_id": 7}, r"validate_token_ids':\s+ValueError: `mask_token_id` must be in \[0, num_tokens=7\)"),
    ],
)
def test_config_rejects_invalid_arguments(kwargs, message):
    with pytest.raises(StrictDataclassError, match=message):
        ScBertConfig(**kwargs)


def test_config_validates_assignment():
    config = ScBertConfig()
    with pytest.raises(StrictDataclassError, match=r"field 'ff_dropout':\s+ValueError: .*in \[0, 1\)"):
        config.ff_dropout = 1.0
    config.mask_token_id = 9  # a check across fields runs on validate(), which save_pretrained calls
    with pytest.raises(StrictDataclassError, match="`mask_token_id` must be in"):
        config.validate()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"logit_adjustment_tau": -0.5}, r"field 'logit_adjustment_tau':\s+ValueError: .*finite number >= 0"),
        ({"logit_adjustment_tau": float("inf")}, r"field 'logit_adjustment_tau':\s+ValueError: .*>= 0, got inf"),
        ({"logit_adjustment_tau": 1.0}, r"`logit_adjustment_tau=1.0` needs `class_prior`"),
        ({"class_prior": [0.7, 0.0]}, r"field 'class_prior':\s+ValueError: .*finite numbers > 0, got \[0.7, 0.0\]"),
        ({"class_prior": [0.7, float("nan")]}, r"field 'class_prior':\s+ValueError: .*finite numbers > 0"),
        ({"class_prior": []}, r"field 'class_prior':\s+ValueError: .*non-empty list"),
        ({"class_prior": ["a", "b"]}, r"field 'class_prior':\s+TypeError"),
        ({"class_prior": [0.2, 0.3, 0.5]}, r"`class_prior` must have one frequency per label \(num_labels=2\), got 3"),
        ({"class_prior": [0.5, 0.5], "num_labels": 3}, r"one frequency per label \(num_labels=3\), got 2"),
    ],
)
def test_config_rejects_invalid_logit_adjustment(kwargs, message):
    with pytest.raises(StrictDataclassError, match=message):
        ScBertConfig(**kwargs)


def test_config_logit_adjustment_fields():
    config = ScBertConfig(num_labels=3, class_prior=[10, 30, 60], logit_adjustment_tau=1)  # counts work too
    assert (config.class_prior, config.logit_adjustment_tau) == ([10, 30, 60], 1)
    assert (ScBertConfig().class_prior, ScBertConfig().logit_adjustment_tau) == (None, 0.0)
    # A prior without adjustment is allowed (recorded, not applied).
    assert ScBertConfig(id2label={0: "a", 1: "b"}, class_prior=[0.1, 0.9]).logit_adjustment_tau == 0.0


def test_config_round_trips_through_save_pretrained(tmp_path):
    config = ScBertConfig.from_preset(
        "scbert-small", max_seq_len=NUM_GENES + 1, classifier_type="pooled", feature_redraw_interval=None,
        id2label={0: "alpha", 1: "beta", 2: "delta"}, class_prior=[0.5, 0.3, 0.2], logit_adjustment_tau=0.5,
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is ScBertConfig
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert loaded.id2label == {0: "alpha", 1: "beta", 2: "delta"} and loaded.class_prior == [0.5, 0.3, 0.2]
    assert (loaded.hidden_size, loaded.logit_adjustment_tau, loaded.feature_redraw_interval) == (64, 0.5, None)


def test_config_loads_a_folder_written_before_logit_adjustment(tmp_path):
    """A config.json of the pre-dataclass ScBertConfig (no class_prior / tau) gives the same values."""
    saved = {
        "model_type": "scbert", "num_tokens": 7, "dim": 32, "depth": 2, "heads": 4, "dim_head": 16, "max_seq_len": 201,
        "nb_features": 44, "feature_redraw_interval": None, "ff_mult": 4, "qkv_bias": False, "use_gene2vec": True,
        "layer_norm_eps": 1e-05, "emb_dropout": 0.1, "attn_dropout": 0.0, "ff_dropout": 0.0, "initializer_range": 0.02,
        "classifier_type": "pooled", "classifier_fc1_size": 512, "classifier_fc2_size": 128, "classifier_dropout": 0.0,
        "mask_token_id": None, "id2label": {str(i): f"LABEL_{i}" for i in range(5)},
        "label2id": {f"LABEL_{i}": i for i in range(5)}, "transformers_version": "5.24.0",
    }
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = AutoConfig.from_pretrained(tmp_path)
    for key, value in saved.items():
        if key not in ("id2label", "transformers_version"):
            assert getattr(config, key) == value, key
    assert config.num_labels == 5 and config.class_prior is None and config.logit_adjustment_tau == 0.0


def test_config_from_pretrained_sets_labels_on_a_masked_lm_folder(tmp_path):
    small_model().save_pretrained(tmp_path)  # class_prior None, the default two labels
    labels = {0: "alpha", 1: "beta", 2: "delta", 3: "gamma"}
    config = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=4, id2label=labels).config
    assert config.num_labels == 4 and config.id2label == labels and config.class_prior is None
    adjusted = AutoConfig.from_pretrained(tmp_path, num_labels=4, class_prior=[4, 3, 2, 1], logit_adjustment_tau=1.0)
    assert adjusted.num_labels == 4 and adjusted.class_prior == [4, 3, 2, 1]
    adjusted.validate()


def test_config_presets():
    assert set(PRESETS) == {"scbert", "scbert-small"}
    assert ScBertConfig.from_preset("scbert").to_dict() == ScBertConfig().to_dict()  # the published defaults
    small = ScBertConfig.from_preset("scbert-small", max_seq_len=NUM_GENES + 1, num_labels=3)
    assert (small.dim, small.depth, small.heads, small.dim_head, small.nb_features) == (64, 2, 4, 16, 64)
    assert (small.max_seq_len, small.num_labels, small.num_tokens) == (NUM_GENES + 1, 3, 7)
    assert ScBertConfig.from_preset("scbert-small", dim=96).dim == 96  # overrides win over the preset
    with pytest.raises(ValueError, match=r"Unknown scBERT preset 'scbert-huge'; expected one of \['scbert', 'scbert-"):
        ScBertConfig.from_preset("scbert-huge")

"""scBERT 2.0 padding-free packed batches: the packed row reproduces the padded batch on every attention path."""

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from modeling_scbert.configuration_scbert2 import ScBert2Config
from modeling_scbert.modeling_scbert2 import ScBert2ForMaskedRegression, ScBert2ForSequenceClassification, ScBert2Model
from tokenization import GeneExpressionTokenizer

VOCAB = 60
CLS = 2
ATOL = 1e-5
LENGTHS = [3, 9, 6, 1]  # genes per cell; the 1-gene cell is a CLS + 1 token segment


def make_model(cls, attn_implementation="eager", **overrides):
    torch.manual_seed(0)
    config = ScBert2Config.from_preset("scbert2-tiny", **{"vocab_size": VOCAB, **overrides})
    return cls._from_config(config, attn_implementation=attn_implementation).eval()


def make_cells(lengths=LENGTHS, seed=0):
    """Sparse cells as the tokenizer stores them: distinct gene token ids with positive values."""
    generator = torch.Generator().manual_seed(seed)
    cells = []
    for length in lengths:
        gene_ids = torch.randperm(VOCAB - 3, generator=generator)[:length] + 3
        values = torch.rand(length, generator=generator) * 4 + 0.1
        cells.append({"gene_ids": gene_ids.numpy(), "values": values.numpy()})
    return cells


def batches(cells, **tokenizer_kwargs):
    """The same cells as a padded batch and as a packed row, built by the tokenizer."""
    genes = [f"G{i}" for i in range(VOCAB - 3)]
    tokenizer = GeneExpressionTokenizer(genes=genes, mode="scbert2", max_length=None, **tokenizer_kwargs)
    return dict(tokenizer.collate(cells)), dict(tokenizer.collate(cells, packed=True))


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


# ----------------------------------------------------------------------------------------------- block-diagonal path
@pytest.mark.parametrize("experts", [0, 4])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_row_matches_padded_batch_at_real_tokens(attn_implementation, experts):
    model = make_model(ScBert2Model, attn_implementation, num_local_experts=experts)
    padded, packed = batches(make_cells())
    with torch.no_grad():
        out_padded = model(**padded, output_hidden_states=True)
        out_packed = model(**packed, output_hidden_states=True)
    real = padded["attention_mask"].bool()
    assert out_packed.last_hidden_state.shape == (1, int(real.sum()), model.config.hidden_size)
    for h_padded, h_packed in zip(out_padded.hidden_states, out_packed.hidden_states):
        torch.testing.assert_close(h_packed[0], h_padded[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_packed.last_hidden_state[0], out_padded.last_hidden_state[real], atol=ATOL, rtol=0)
    if experts:
        # Both average the routing over the same real tokens: padding is masked out, packed rows have none.
        torch.testing.assert_close(out_packed.aux_loss, out_padded.aux_loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("pooling,expression_pooling", [("cls", False), ("mean", False), ("mean_max", False),
                                                        ("mean_max", True)])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_classification_pools_per_cell(attn_implementation, pooling, expression_pooling):
    model = make_model(ScBert2ForSequenceClassification, attn_implementation, num_labels=3, pooling=pooling,
                       expression_pooling=expression_pooling, num_local_experts=4)
    cells = make_cells()
    for label, cell in zip([0, 2, 1, 2], cells):
        cell["label"] = label
    padded, packed = batches(cells)
    assert packed["labels"].shape == (len(cells),)
    with torch.no_grad():
        out_padded, out_packed = model(**padded), model(**packed)
    assert out_packed.logits.shape == (len(cells), 3)
    torch.testing.assert_close(out_packed.logits, out_padded.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_packed.loss, out_padded.loss, atol=ATOL, rtol=0)


def test_packed_mean_pooling_without_cls_tokens():
    model = make_model(ScBert2ForSequenceClassification, "sdpa", num_labels=2, pooling="mean")
    padded, packed = batches(make_cells(), add_cls_token=False)
    assert not bool((packed["input_ids"] == CLS).any())
    with torch.no_grad():
        torch.testing.assert_close(model(**packed).logits, model(**padded).logits, atol=ATOL, rtol=0)


def test_position_ids_alone_mark_the_cells():
    """transformers' DataCollatorWithFlattening default: position_ids restarting at 0, no cu_seq_lens."""
    model = make_model(ScBert2ForSequenceClassification, "sdpa", num_labels=3, pooling="mean")
    padded, packed = batches(make_cells())
    position_only = {k: v for k, v in packed.items() if not k.startswith(("cu_seq_lens", "max_length"))}
    with torch.no_grad():
        torch.testing.assert_close(model(**position_only).logits, model(**padded).logits, atol=ATOL, rtol=0)


def test_packed_masked_regression_is_token_wise():
    model = make_model(ScBert2ForMaskedRegression, "sdpa", num_local_experts=4)
    padded, packed = batches(make_cells())
    real = padded["attention_mask"].bool()
    # Hide every third real token's value in both layouts.
    hidden = torch.zeros_like(real)
    hidden[real] = torch.arange(int(real.sum())) % 3 == 0
    labels = torch.where(hidden, padded["bin_ids"], -100)
    value_labels = padded["values"]
    with torch.no_grad():
        out_padded = model(**padded, value_mask=hidden, labels=labels, value_labels=value_labels)
        out_packed = model(**packed, value_mask=hidden[real][None], labels=labels[real][None],
                           value_labels=value_labels[real][None])
    torch.testing.assert_close(out_packed.bin_logits[0], out_padded.bin_logits[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_packed.loss, out_padded.loss, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------- varlen path
def cpu_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, cu_seq_lens_q=None,
                         cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """A CPU stand-in for flash_attn_varlen_func: attention within each [cu[i], cu[i + 1]) segment of the one row."""
    cpu_varlen_attention.calls.append(
        {"attention_mask": attention_mask, "cu_seq_lens_q": cu_seq_lens_q, "cu_seq_lens_k": cu_seq_lens_k,
         "max_length_q": max_length_q, "max_length_k": max_length_k, "position_ids": kwargs.get("position_ids")}
    )
    bounds = cu_seq_lens_q.tolist()
    segments = [
        F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], scale=scaling, enable_gqa=True
        )
        for start, end in zip(bounds[:-1], bounds[1:])
    ]
    # [1, heads, T, D] -> [1, T, heads, D], the layout flash attention returns
    return torch.cat(segments, dim=2).transpose(1, 2), None


cpu_varlen_attention.calls = []


def test_varlen_attention_gets_the_flash_kwargs_and_matches_padded():
    AttentionInterface.register("cpu_varlen_test", cpu_varlen_attention)
    reference = make_model(ScBert2ForSequenceClassification, "sdpa", num_labels=3, num_local_experts=4)
    varlen = make_model(ScBert2ForSequenceClassification, "sdpa", num_labels=3, num_local_experts=4)
    varlen.set_attn_implementation("cpu_varlen_test")
    assert varlen.config._attn_implementation == "cpu_varlen_test"
    padded, packed = batches(make_cells())
    cpu_varlen_attention.calls.clear()
    with torch.no_grad():
        out_padded = reference(**padded, output_hidden_states=True)
        out_packed = varlen(**packed, output_hidden_states=True)
    assert len(cpu_varlen_attention.calls) == varlen.config.num_hidden_layers
    for call in cpu_varlen_attention.calls:
        assert call["attention_mask"] is None
        assert call["cu_seq_lens_q"].dtype == torch.int32 and call["cu_seq_lens_q"].tolist() == [0, 4, 14, 21, 23]
        assert call["cu_seq_lens_k"].tolist() == call["cu_seq_lens_q"].tolist()
        assert call["max_length_q"] == call["max_length_k"] == 10 and isinstance(call["max_length_q"], int)
        assert torch.equal(call["position_ids"], packed["position_ids"])
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(out_packed.hidden_states[-1][0], out_padded.hidden_states[-1][real], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_packed.logits, out_padded.logits, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_flex_attention_packed_matches_padded():
    """flex_attention gets the block-diagonal mask as a BlockMask, which skips the cross-cell blocks."""
    model = make_model(ScBert2ForSequenceClassification, "flex_attention", num_labels=3, num_local_experts=4)
    padded, packed = batches(make_cells())
    with torch.no_grad():
        torch.testing.assert_close(model(**packed).logits, model(**padded).logits, atol=ATOL, rtol=0)


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="flash_attention_2 needs CUDA and the flash_attn package",
)
def test_flash_attention_2_packed_matches_padded():
    torch.manual_seed(0)
    config = ScBert2Config.from_preset("scbert2-tiny", vocab_size=VOCAB, num_labels=3, num_local_experts=4)
    model = ScBert2ForSequenceClassification._from_config(
        config, attn_implementation="flash_attention_2", dtype=torch.bfloat16
    ).cuda().eval()
    padded, packed = batches(make_cells())
    padded = {k: v.cuda() for k, v in padded.items()}
    packed = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in packed.items()}
    with torch.no_grad():
        out_padded, out_packed = model(**padded), model(**packed)
    torch.testing.assert_close(out_packed.logits, out_padded.logits, atol=2e-2, rtol=0)


# ----------------------------------------------------------------------------------------------- tokenizer
def test_packed_collate_on_baron_cells(baron_small):
    tokenizer = GeneExpressionTokenizer.from_adata(baron_small, mode="scbert2", max_length=65)
    cells = [dict(row) for row in tokenizer.to_dataset(baron_small[:6], label_key="cell_type1")]
    padded, packed = tokenizer.collate(cells), tokenizer.collate(cells, packed=True)
    real = padded["attention_mask"].bool()
    lengths = real.sum(dim=1)
    total = int(lengths.sum())

    assert "attention_mask" not in packed
    for key in ("input_ids", "values", "bin_ids", "position_ids"):
        assert packed[key].shape == (1, total), key
    for key in ("input_ids", "values", "bin_ids"):
        torch.testing.assert_close(packed[key][0], padded[key][real], atol=0, rtol=0)
    expected_bounds = [0] + torch.cumsum(lengths, 0).tolist()
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert packed[key].dtype == torch.int32 and packed[key].tolist() == expected_bounds
    assert packed["max_length_q"] == packed["max_length_k"] == int(lengths.max()) <= 65
    assert type(packed["max_length_q"]) is int
    expected_positions = torch.cat([torch.arange(int(n)) for n in lengths])
    assert torch.equal(packed["position_ids"][0], expected_positions)
    assert bool((packed["input_ids"][0, packed["cu_seq_lens_q"][:-1].long()] == tokenizer.cls_token_id).all())
    assert torch.equal(packed["labels"], padded["labels"]) and packed["labels"].shape == (6,)

    as_numpy = tokenizer.collate(cells, return_tensors=None, packed=True)
    assert isinstance(as_numpy["input_ids"], np.ndarray) and as_numpy["cu_seq_lens_q"].dtype == np.int32

    config = ScBert2Config.from_preset("scbert2-tiny", vocab_size=tokenizer.vocab_size, num_labels=13)
    torch.manual_seed(0)
    model = ScBert2ForSequenceClassification._from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**packed).logits, model(**padded).logits, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------- bad input
def test_packing_needs_scbert2_mode():
    tokenizer = GeneExpressionTokenizer(genes=[f"G{i}" for i in range(VOCAB - 3)], mode="scbert")
    with pytest.raises(ValueError, match="packed=True needs mode='scbert2'"):
        tokenizer.collate(make_cells(), packed=True)


def test_malformed_packed_input_is_refused():
    model = make_model(ScBert2Model, "sdpa")
    padded, packed = batches(make_cells())
    with pytest.raises(ValueError, match="packed batch"):
        model(**packed, attention_mask=torch.ones_like(packed["input_ids"]))
    with pytest.raises(ValueError, match="packed batch"):
        model(**padded, position_ids=torch.arange(padded["input_ids"].shape[1]).expand(len(LENGTHS), -1))
    truncated = {**packed, "cu_seq_lens_q": packed["cu_seq_lens_q"][:-1]}
    with pytest.raises(ValueError, match="cu_seq_lens_q ends at 21 but the packed row holds 23 tokens"):
        model(**truncated)

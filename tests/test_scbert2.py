"""scBERT 2.0: attention backends, set/padding invariance, GQA, MoE routing, losses, save/load, torch.compile."""

import importlib.util

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from modeling_scbert.configuration_scbert2 import PRESETS, ScBert2Config
from modeling_scbert.modeling_scbert2 import (
    MaskedRegressionOutput,
    ScBert2ForMaskedRegression,
    ScBert2ForSequenceClassification,
    ScBert2MLP,
    ScBert2Model,
    ScBert2SparseMoeBlock,
)

VOCAB = 60
PAD, MASK, CLS = 0, 1, 2
ATOL = 1e-5


def make_config(**overrides) -> ScBert2Config:
    return ScBert2Config.from_preset("scbert2-tiny", **{"vocab_size": VOCAB, **overrides})


def make_model(cls, attn_implementation="eager", seed=0, **overrides):
    torch.manual_seed(seed)
    model = cls._from_config(make_config(**overrides), attn_implementation=attn_implementation)
    return model.eval()


def make_cells(lengths, seed=0, with_cls=True):
    """One cell per length: distinct genes with positive values (and CLS first), as python lists."""
    generator = torch.Generator().manual_seed(seed)
    cells = []
    for length in lengths:
        genes = (torch.randperm(VOCAB - 3, generator=generator)[:length] + 3).tolist()
        values = (torch.rand(length, generator=generator) * 4 + 0.1).tolist()
        if with_cls:
            genes, values = [CLS] + genes, [0.0] + values
        cells.append((genes, values))
    return cells


def collate(cells, num_bins=5):
    """Right-padded batch with the tokenizer's keys."""
    length = max(len(genes) for genes, _ in cells)
    input_ids = torch.full((len(cells), length), PAD, dtype=torch.long)
    values = torch.zeros(len(cells), length)
    attention_mask = torch.zeros(len(cells), length, dtype=torch.long)
    for row, (genes, vals) in enumerate(cells):
        input_ids[row, : len(genes)] = torch.tensor(genes)
        values[row, : len(genes)] = torch.tensor(vals)
        attention_mask[row, : len(genes)] = 1
    bin_ids = torch.where(values > 0, torch.clamp(values.ceil().long(), 1, num_bins), 0)
    return {"input_ids": input_ids, "values": values, "bin_ids": bin_ids, "attention_mask": attention_mask}


def real(tensor, attention_mask):
    """The non-padding rows of a [B, L, ...] tensor, flattened to [N, ...]."""
    return tensor[attention_mask.bool()]


# ----------------------------------------------------------------------------------------------- attention backends
@pytest.mark.parametrize("experts", [0, 4])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "flex_attention"])
def test_attention_backends_agree_with_eager_with_padding(attn_implementation, experts):
    eager = make_model(ScBert2Model, "eager", num_local_experts=experts)
    other = make_model(ScBert2Model, attn_implementation, num_local_experts=experts)
    other.load_state_dict(eager.state_dict())
    assert other.config._attn_implementation == attn_implementation and eager.config._attn_implementation == "eager"
    batch = collate(make_cells([3, 9, 6]))
    with torch.no_grad():
        out_eager, out_other = eager(**batch), other(**batch)
    torch.testing.assert_close(out_other.last_hidden_state, out_eager.last_hidden_state, atol=ATOL, rtol=0)


def test_eager_attention_ignores_padding_keys():
    model = make_model(ScBert2Model, "eager")
    batch = collate(make_cells([3, 8]))
    with torch.no_grad():
        out = model(**batch, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    padding_keys = ~batch["attention_mask"].bool()  # [B, L]
    for probs in out.attentions:  # [B, heads, L, L]
        assert probs[padding_keys[:, None, None, :].expand_as(probs)].abs().max() == 0
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="flash_attention_2 needs CUDA and the flash_attn package",
)
def test_flash_attention_2_matches_sdpa():
    config = make_config()
    torch.manual_seed(0)
    flash = ScBert2Model._from_config(config, attn_implementation="flash_attention_2", dtype=torch.bfloat16).cuda()
    sdpa = ScBert2Model._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16).cuda()
    sdpa.load_state_dict(flash.state_dict())
    batch = {k: v.cuda() for k, v in collate(make_cells([3, 9, 6])).items()}
    with torch.no_grad():
        a, b = flash(**batch).last_hidden_state, sdpa(**batch).last_hidden_state
    mask = batch["attention_mask"]
    torch.testing.assert_close(real(a, mask), real(b, mask), atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------------------------- invariances
@pytest.mark.parametrize("pooling", ["mean", "cls", "mean_max"])
@pytest.mark.parametrize("experts", [0, 4])
def test_permuting_genes_permutes_outputs(pooling, experts):
    model = make_model(ScBert2ForSequenceClassification, pooling=pooling, num_local_experts=experts, num_labels=3)
    base = ScBert2Model._from_config(model.config).eval()
    base.load_state_dict(model.model.state_dict())
    (genes, values), (other_genes, other_values) = make_cells([10, 14], seed=1)
    order = [0] + (torch.randperm(len(genes) - 1, generator=torch.Generator().manual_seed(3)) + 1).tolist()
    shuffled = ([genes[i] for i in order], [values[i] for i in order])
    original_batch = collate([(genes, values), (other_genes, other_values)])
    shuffled_batch = collate([shuffled, (other_genes, other_values)])
    with torch.no_grad():
        hidden = base(**original_batch).last_hidden_state[0, : len(genes)]
        hidden_shuffled = base(**shuffled_batch).last_hidden_state[0, : len(genes)]
        logits = model(**original_batch).logits
        logits_shuffled = model(**shuffled_batch).logits
    torch.testing.assert_close(hidden_shuffled, hidden[order], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits_shuffled, logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("experts", [0, 4])
def test_a_cell_alone_equals_the_cell_in_a_padded_batch(attn_implementation, experts):
    model = make_model(ScBert2ForMaskedRegression, attn_implementation, num_local_experts=experts)
    cells = make_cells([5, 12, 9], seed=2)
    with torch.no_grad():
        alone = model(**collate(cells[:1]))
        batched = model(**collate(cells))
    n = len(cells[0][0])
    torch.testing.assert_close(batched.bin_logits[0, :n], alone.bin_logits[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(batched.value_predictions[0, :n], alone.value_predictions[0], atol=ATOL, rtol=0)


def test_attention_mask_defaults_to_non_padding_tokens():
    model = make_model(ScBert2Model)
    batch = collate(make_cells([4, 7]))
    with torch.no_grad():
        explicit = model(**batch).last_hidden_state
        implicit = model(**{k: v for k, v in batch.items() if k != "attention_mask"}).last_hidden_state
    torch.testing.assert_close(implicit, explicit, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ grouped-query attention
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_variants_run(kv_heads):
    model = make_model(ScBert2Model, "sdpa", num_attention_heads=4, num_key_value_heads=kv_heads)
    out = model(**collate(make_cells([4, 6])))
    assert out.last_hidden_state.shape == (2, 7, model.config.hidden_size)
    assert model.layers[0].self_attn.k_proj.out_features == kv_heads * model.config.head_dim


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_equals_mha_with_duplicated_kv_heads(kv_heads):
    gqa = make_model(ScBert2Model, num_attention_heads=4, num_key_value_heads=kv_heads)
    mha = make_model(ScBert2Model, num_attention_heads=4, num_key_value_heads=4)
    group, head_dim, hidden = 4 // kv_heads, gqa.config.head_dim, gqa.config.hidden_size
    state = gqa.state_dict()
    for name, weight in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            # [kv * D, H] -> [kv, D, H] -> [kv * group, D, H] -> [heads * D, H]: query head h reads kv head h // group
            state[name] = weight.view(kv_heads, head_dim, hidden).repeat_interleave(group, dim=0).reshape(-1, hidden)
    mha.load_state_dict(state)
    batch = collate(make_cells([5, 8]))
    with torch.no_grad():
        torch.testing.assert_close(mha(**batch).last_hidden_state, gqa(**batch).last_hidden_state, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------- mixture of experts
def test_moe_with_identical_experts_and_full_top_k_equals_dense_block():
    config = make_config(num_local_experts=4, num_experts_per_tok=4)
    torch.manual_seed(0)
    dense, moe = ScBert2MLP(config), ScBert2SparseMoeBlock(config)
    for expert in moe.experts:
        expert.load_state_dict(dense.state_dict())
    x = torch.randn(2, 5, config.hidden_size)
    with torch.no_grad():
        out, router_logits = moe(x)
        torch.testing.assert_close(out, dense(x), atol=ATOL, rtol=0)
    assert router_logits.shape == (10, 4)


def test_moe_equals_every_expert_on_every_token_weighted_by_its_top_k_choices():
    config = make_config(num_local_experts=5, num_experts_per_tok=2)
    torch.manual_seed(0)
    moe = ScBert2SparseMoeBlock(config)
    x = torch.randn(3, 7, config.hidden_size)
    token_mask = torch.ones(3, 7, dtype=torch.long)
    token_mask[1, 4:] = 0
    out, _ = moe(x, token_mask)
    flat = x.reshape(-1, config.hidden_size)
    _, weights, index = moe.route(flat)
    every_expert = torch.stack([expert(flat) for expert in moe.experts], dim=1)  # [N, E, H]
    chosen = every_expert.gather(1, index[..., None].expand(-1, -1, config.hidden_size))  # [N, k, H]
    reference = (chosen * weights[..., None]).sum(dim=1) * token_mask.reshape(-1, 1)
    torch.testing.assert_close(out.reshape(-1, config.hidden_size), reference, atol=ATOL, rtol=0)
    out.sum().backward()
    assert all(p.grad is not None for p in moe.gate.parameters())


def test_moe_model_with_identical_experts_equals_dense_model():
    dense = make_model(ScBert2Model)
    moe = make_model(ScBert2Model, num_local_experts=3, num_experts_per_tok=3)
    state = {k: v for k, v in dense.state_dict().items()}
    for name, weight in dense.state_dict().items():
        if ".mlp." in name:
            state.pop(name)
            for e in range(3):
                state[name.replace(".mlp.", f".mlp.experts.{e}.")] = weight
    for i in range(moe.config.num_hidden_layers):
        state[f"layers.{i}.mlp.gate.weight"] = moe.state_dict()[f"layers.{i}.mlp.gate.weight"]
    moe.load_state_dict(state)
    batch = collate(make_cells([4, 9]))
    with torch.no_grad():
        moe_out, dense_out = moe(**batch).last_hidden_state, dense(**batch).last_hidden_state
    # Padding tokens skip the experts, so only real tokens are comparable.
    mask = batch["attention_mask"]
    torch.testing.assert_close(real(moe_out, mask), real(dense_out, mask), atol=ATOL, rtol=0)


def test_each_real_token_is_routed_to_exactly_k_experts():
    model = make_model(ScBert2Model, num_local_experts=4, num_experts_per_tok=2)
    batch = collate(make_cells([4, 11, 7]))
    hidden = torch.randn(3 * 12, model.config.hidden_size)
    block = model.layers[0].mlp
    _, weights, index = block.route(hidden)
    assert index.shape == (36, 2) and all(len(set(row)) == 2 for row in index.tolist())
    torch.testing.assert_close(weights.sum(-1), torch.ones(36))

    rows_per_layer = []
    hooks = [
        expert.register_forward_hook(lambda module, args, output: rows_per_layer.append(args[0].shape[0]))
        for layer in model.layers
        for expert in layer.mlp.experts
    ]
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    real_tokens = int(batch["attention_mask"].sum())
    assert sum(rows_per_layer) == model.config.num_hidden_layers * real_tokens * 2  # padding is never dispatched


def test_aux_loss_and_router_logits():
    model = make_model(ScBert2ForMaskedRegression, num_local_experts=4, num_experts_per_tok=2, moe_layers=[1])
    batch = collate(make_cells([4, 9]))
    out = model(**batch, output_router_logits=True)
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0
    assert len(out.router_logits) == 1 and out.router_logits[0].shape == (2 * 10, 4)
    assert model(**batch).router_logits is None  # only on request
    assert not model.model.layers[0].is_moe and model.model.layers[1].is_moe
    assert make_model(ScBert2Model)(**batch).aux_loss is None  # dense models have none


# ----------------------------------------------------------------------------------------------- heads and losses
@pytest.mark.parametrize("experts", [0, 4])
def test_masked_regression_losses_and_backward(experts):
    model = make_model(
        ScBert2ForMaskedRegression, num_local_experts=experts, bin_loss_weight=0.5, value_loss_weight=2.0
    )
    model.train()
    batch = collate(make_cells([6, 10]))
    value_mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    value_mask[:, 2:4] = True
    labels = torch.where(value_mask, batch["bin_ids"], -100)
    out = model(**batch, value_mask=value_mask, labels=labels, value_labels=batch["values"])
    assert isinstance(out, MaskedRegressionOutput)
    assert out.bin_logits.shape == (2, 11, model.config.num_bins + 1) and out.value_predictions.shape == (2, 11)
    expected = 0.5 * out.bin_loss + 2.0 * out.value_loss
    if experts:
        expected = expected + model.config.router_aux_loss_coef * out.aux_loss
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    embeddings = model.model.embeddings
    assert embeddings.mask_value_embedding.grad.abs().sum() > 0
    assert embeddings.value_embeddings.bin_table.weight.grad.abs().sum() > 0
    assert model.bin_head.weight.grad is not None and model.value_head.weight.grad is not None
    if experts:
        assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0

    # Without value_labels only the bin loss counts, and value_labels alone are scored at value_mask.
    bin_only = model(**batch, value_mask=value_mask, labels=labels)
    assert bin_only.value_loss is None and bin_only.bin_loss is not None
    value_only = model(**batch, value_mask=value_mask, value_labels=batch["values"])
    torch.testing.assert_close(value_only.value_loss, out.value_loss)
    with pytest.raises(ValueError, match="value_labels"):
        model(**batch, value_labels=batch["values"])


def test_masked_value_is_replaced_by_the_mask_embedding():
    model = make_model(ScBert2ForMaskedRegression)
    batch = collate(make_cells([6, 10]))
    value_mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    value_mask[0, 3] = value_mask[1, 5] = True
    changed_masked = {**batch, "values": torch.where(value_mask, batch["values"] + 7.0, batch["values"])}
    changed_visible = {**batch, "values": batch["values"].clone()}
    changed_visible["values"][0, 2] += 7.0
    with torch.no_grad():
        reference = model(**batch, value_mask=value_mask).bin_logits
        changed = model(**changed_masked, value_mask=value_mask).bin_logits
        torch.testing.assert_close(changed, reference, atol=0, rtol=0)
        assert not torch.allclose(model(**changed_visible, value_mask=value_mask).bin_logits, reference)
        no_mask = model(**batch).bin_logits
        torch.testing.assert_close(model(**batch, value_mask=torch.zeros_like(value_mask)).bin_logits, no_mask)
        assert not torch.allclose(reference, no_mask)
        model.model.embeddings.mask_value_embedding.add_(1.0)
        assert not torch.allclose(model(**batch, value_mask=value_mask).bin_logits, reference)


def test_bin_value_embedding_uses_bin_ids():
    model = make_model(ScBert2Model, value_embedding_type="bin")
    assert model.embeddings.value_embeddings.num_embeddings == model.config.num_bins + 1
    batch = collate(make_cells([5, 7]))
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
        # Only the bins matter: values that keep their bin change nothing.
        same_bins = model(**{**batch, "values": batch["values"] * 0 + 0.5}).last_hidden_state
        torch.testing.assert_close(same_bins, reference, atol=0, rtol=0)
        shifted = model(**{**batch, "bin_ids": batch["bin_ids"].clamp(max=1)}).last_hidden_state
    assert not torch.allclose(shifted, reference)
    with pytest.raises(ValueError, match="bin_ids"):
        model(input_ids=batch["input_ids"], values=batch["values"])
    with pytest.raises(ValueError, match="values"):
        make_model(ScBert2Model)(input_ids=batch["input_ids"], bin_ids=batch["bin_ids"])


@pytest.mark.parametrize("pooling", ["cls", "mean", "mean_max"])
def test_sequence_classification_losses(pooling):
    batch = collate(make_cells([5, 8, 3]))
    model = make_model(ScBert2ForSequenceClassification, pooling=pooling, num_labels=3, num_local_experts=4)
    out = model(**batch, labels=torch.tensor([0, 2, 1]))
    assert model.config.problem_type == "single_label_classification" and out.logits.shape == (3, 3)
    expected = torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2, 1]))
    torch.testing.assert_close(out.loss, expected + model.config.router_aux_loss_coef * out.aux_loss)
    out.loss.backward()
    assert model.classifier.weight.grad.abs().sum() > 0

    regression = make_model(ScBert2ForSequenceClassification, pooling=pooling, num_labels=1)
    out = regression(**batch, labels=torch.tensor([0.5, 1.0, 2.0]))
    assert regression.config.problem_type == "regression"
    expected = torch.nn.functional.mse_loss(out.logits.squeeze(-1), torch.tensor([0.5, 1.0, 2.0]))
    torch.testing.assert_close(out.loss, expected)

    multi = make_model(ScBert2ForSequenceClassification, pooling=pooling, num_labels=2)
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    out = multi(**batch, labels=targets)
    assert multi.config.problem_type == "multi_label_classification"
    torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, targets))


def test_mean_pooling_skips_cls_and_padding():
    model = make_model(ScBert2ForSequenceClassification, pooling="mean", num_labels=2)
    batch = collate(make_cells([3, 6]))
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state
        pooled = model.pool(hidden, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(pooled[0], hidden[0, 1:4].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1, 1:7].mean(0))


def test_mean_max_pooling_adds_the_maximum_over_gene_tokens():
    model = make_model(ScBert2ForSequenceClassification, pooling="mean_max", num_labels=2)
    assert model.classifier.in_features == 2 * model.config.hidden_size
    batch = collate(make_cells([3, 6]))
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state
        pooled = model.pool(hidden, batch["input_ids"], batch["attention_mask"])
    for row, length in enumerate([3, 6]):
        genes = hidden[row, 1:1 + length]  # neither CLS nor padding
        torch.testing.assert_close(pooled[row], torch.cat([genes.mean(0), genes.amax(0)]))


def test_expression_pooling_reads_the_expression_through_the_gene_table():
    model = make_model(ScBert2ForSequenceClassification, pooling="mean_max", expression_pooling=True, num_labels=2)
    hidden_size = model.config.hidden_size
    assert model.classifier.in_features == 3 * hidden_size
    batch = collate(make_cells([3, 6]))
    table = model.get_input_embeddings().weight
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state
        pooled = model.pool(hidden, batch["input_ids"], batch["attention_mask"], values=batch["values"])
        out = model(**batch)
    torch.testing.assert_close(out.pooled_output, pooled)
    for row, length in enumerate([3, 6]):
        genes, values = batch["input_ids"][row, 1:1 + length], batch["values"][row, 1:1 + length]  # no CLS, no padding
        expected = model.expression_norm((values.unsqueeze(-1) * table[genes]).sum(0))
        torch.testing.assert_close(pooled[row, 2 * hidden_size:], expected)
    # RMS-normalised: a cell whose every value doubles (deeper sequencing of the same profile) reads the same.
    doubled = {**batch, "values": batch["values"] * 2}
    with torch.no_grad():
        torch.testing.assert_close(model(**doubled).pooled_output[:, 2 * hidden_size:],
                                   pooled[:, 2 * hidden_size:], atol=1e-3, rtol=1e-3)  # up to the norm's eps


def test_expression_pooling_gradients_are_bitwise_reproducible():
    """The same batch gives the same gradient every time: a gene's gradient summed over the tokens that read it must
    not depend on thread timing (the gene table's gradient once drifted by ~1e-7 per step, and fine-tuning runs with
    the same seed ended up to 0.14 macro-F1 apart)."""
    model = make_model(ScBert2ForSequenceClassification, expression_pooling=True, num_labels=2).train()
    batch = collate(make_cells([VOCAB - 3] * 64))  # every gene in every cell: many tokens per table row
    labels = torch.arange(64) % 2
    gradients = []
    for _ in range(5):
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks
        model(**batch, labels=labels).loss.backward()
        gradients.append(model.get_input_embeddings().weight.grad.clone())
    for gradient in gradients[1:]:
        assert torch.equal(gradient, gradients[0])


def test_expression_pooling_needs_values():
    model = make_model(ScBert2ForSequenceClassification, expression_pooling=True, value_embedding_type="bin",
                       pooling="mean", num_labels=2)
    batch = collate(make_cells([3, 6]))
    batch.pop("values")
    with pytest.raises(ValueError, match="pass `values`"):
        model(**batch)


def test_cls_pooling_requires_cls_first():
    model = make_model(ScBert2ForSequenceClassification, pooling="cls", num_labels=2)
    with pytest.raises(ValueError, match="CLS token"):
        model(**collate(make_cells([3, 6], with_cls=False)))
    mean_model = make_model(ScBert2ForSequenceClassification, pooling="mean", num_labels=2)
    assert mean_model(**collate(make_cells([3, 6], with_cls=False))).logits.shape == (2, 2)


def test_return_dict_false_and_unknown_keys():
    model = make_model(ScBert2ForMaskedRegression)
    batch = collate(make_cells([3, 5]))
    out = model(**batch, cell_ids=["a", "b"], special_tokens_mask=batch["attention_mask"], return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (2, 6, model.config.num_bins + 1)


def test_gradient_checkpointing_matches():
    model = make_model(ScBert2ForMaskedRegression, num_local_experts=4)
    batch = collate(make_cells([4, 6]))
    labels = torch.where(batch["attention_mask"].bool(), batch["bin_ids"], -100)
    model.train()
    model(**batch, labels=labels).loss.backward()
    reference = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(**batch, labels=labels).loss.backward()
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight.grad, reference)


# ----------------------------------------------------------------------------------------------- gene embeddings
def test_load_gene_embeddings_from_external_matrix():
    model = make_model(ScBert2ForSequenceClassification, num_labels=2)
    hidden = model.config.hidden_size
    genes_only = torch.randn(VOCAB - 3, hidden)
    model.load_gene_embeddings(genes_only.numpy(), freeze=True)
    weight = model.get_input_embeddings().weight
    torch.testing.assert_close(weight[3:], genes_only)
    assert not weight.requires_grad
    full = torch.randn(VOCAB, hidden)
    model.load_gene_embeddings(full)
    torch.testing.assert_close(weight[1:], full[1:])
    assert weight[PAD].abs().sum() == 0 and weight.requires_grad  # the pad row stays zero
    for shape in [(VOCAB, hidden + 1), (VOCAB - 1, hidden), (VOCAB * hidden,)]:
        with pytest.raises(ValueError, match="Gene embedding matrix has shape"):
            model.load_gene_embeddings(torch.zeros(shape))


# ----------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize(
    "cls, auto_cls, extra",
    [
        (ScBert2Model, AutoModel, {}),
        (ScBert2ForMaskedRegression, AutoModelForMaskedLM, {}),
        (ScBert2ForSequenceClassification, AutoModelForSequenceClassification, {"num_labels": 4}),
    ],
)
def test_save_load_round_trip_through_auto_classes(tmp_path, cls, auto_cls, extra):
    model = make_model(cls, "sdpa", num_local_experts=4, moe_layers=[0], **extra)
    model.save_pretrained(tmp_path)
    loaded = auto_cls.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert type(loaded) is cls and loaded.config._attn_implementation == "sdpa"
    saved, reloaded = model.config.to_dict(), loaded.config.to_dict()
    saved.pop("_name_or_path"), reloaded.pop("_name_or_path")
    assert reloaded == saved
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    batch = collate(make_cells([4, 7]))
    with torch.no_grad():
        for a, b in zip(model(**batch).to_tuple(), loaded(**batch).to_tuple()):
            assert torch.equal(a, b)
    eager = auto_cls.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"


def test_base_model_loads_from_a_head_checkpoint(tmp_path):
    model = make_model(ScBert2ForMaskedRegression)
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(base) is ScBert2Model
    batch = collate(make_cells([4, 7]))
    with torch.no_grad():
        assert torch.equal(base(**batch).last_hidden_state, model.model(**batch).last_hidden_state)


REMOTE_CODE_CHECK = """
import sys, torch
from transformers import AutoModel, AutoModelForMaskedLM
assert "modeling_scbert" not in sys.modules
folder = sys.argv[1]
model = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager").eval()
base = AutoModel.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
from safetensors.torch import load_file
batch = load_file(folder + "/check.safetensors")
expected = batch.pop("expected_bin_logits")
with torch.no_grad():
    # allclose, not equal: the child may run with another thread count, which changes summation order.
    assert torch.allclose(model(**batch).bin_logits, expected, atol=1e-6), "remote-code logits differ"
print("REMOTE CODE OK", type(model).__name__, type(base).__name__)
"""


def test_loads_as_hub_remote_code_without_the_package(tmp_path):
    """The two model files alone (as uploaded to the Hub) load with trust_remote_code in a fresh interpreter."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import modeling_scbert.modeling_scbert2 as modeling

    model = make_model(ScBert2ForMaskedRegression, num_local_experts=4)
    model.config.auto_map = {
        "AutoConfig": "configuration_scbert2.ScBert2Config",
        "AutoModel": "modeling_scbert2.ScBert2Model",
        "AutoModelForMaskedLM": "modeling_scbert2.ScBert2ForMaskedRegression",
        "AutoModelForSequenceClassification": "modeling_scbert2.ScBert2ForSequenceClassification",
    }
    model.save_pretrained(tmp_path)
    source = Path(modeling.__file__).parent
    for name in ("configuration_scbert2.py", "modeling_scbert2.py"):
        shutil.copy(source / name, tmp_path / name)
    batch = collate(make_cells([4, 7]))
    from safetensors.torch import save_file

    with torch.no_grad():
        expected = model(**batch).bin_logits
    save_file({**{k: v.contiguous() for k, v in batch.items()}, "expected_bin_logits": expected},
              tmp_path / "check.safetensors")
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_CHECK, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert "REMOTE CODE OK ScBert2ForMaskedRegression ScBert2Model" in result.stdout, result.stderr[-3000:]


# ----------------------------------------------------------------------------------------------- config
# `@strict` names the field (or, for a check across fields, the validator) before the reason.
@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, "divisible by `num_attention_heads`"),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "divisible by `num_key_value_heads`"),
        ({"hidden_size": 0}, r"field 'hidden_size':\s+ValueError: Value must be a positive integer, got 0"),
        ({"num_hidden_layers": -1}, r"field 'num_hidden_layers':\s+ValueError: Value must be a positive integer"),
        ({"num_attention_heads": 0}, r"field 'num_attention_heads':\s+ValueError: Value must be a positive integer"),
        ({"vocab_size": 60.0}, r"field 'vocab_size':\s+TypeError: Field 'vocab_size' expected int, got float"),
        ({"head_dim": 0}, r"field 'head_dim':\s+ValueError: Value must be a positive integer or None"),
        ({"moe_intermediate_size": 0}, r"field 'moe_intermediate_size':\s+ValueError: .*positive integer or None"),
        ({"attention_dropout": 1.0}, r"field 'attention_dropout':\s+ValueError: .*dropout probability .*\[0, 1\)"),
        ({"hidden_dropout": -0.1}, r"field 'hidden_dropout':\s+ValueError: .*dropout probability"),
        ({"classifier_dropout": 1.5}, r"field 'classifier_dropout':\s+ValueError: .*dropout probability"),
        ({"rms_norm_eps": 0.0}, r"field 'rms_norm_eps':\s+ValueError: Value must be a finite number > 0"),
        ({"initializer_range": -1.0}, r"field 'initializer_range':\s+ValueError: Value must be a finite number > 0"),
        ({"router_aux_loss_coef": -0.1}, r"field 'router_aux_loss_coef':\s+ValueError: .*>= 0"),
        ({"value_loss_weight": -1.0}, r"field 'value_loss_weight':\s+ValueError: .*>= 0"),
        ({"value_embedding_type": "linear"}, r"field 'value_embedding_type':\s+TypeError: .*expected one of"),
        ({"pooling": "max"}, r"field 'pooling':\s+TypeError: .*expected one of \('cls', 'mean', 'mean_max'\)"),
        ({"mask_token_id": 0}, "special token ids must be distinct"),
        ({"cls_token_id": VOCAB}, r"`cls_token_id` must be in \[0, vocab_size"),
        ({"num_local_experts": -1}, r"field 'num_local_experts':\s+ValueError: .*>= 0"),
        ({"num_local_experts": 4, "num_experts_per_tok": 5}, r"top-k\) must be in \[1, num_local_experts=4\]"),
        ({"num_local_experts": 4, "num_experts_per_tok": 0}, r"`num_experts_per_tok` \(top-k\)"),
        ({"num_local_experts": 4, "moe_layers": [0, 2]}, r"must be layer indices in \[0, num_hidden_layers=2\)"),
        ({"num_local_experts": 4, "moe_layers": [1, 1]}, "must not repeat a layer"),
        ({"num_local_experts": 0, "moe_layers": [0]}, "needs `num_local_experts > 1`"),
        ({"logit_adjustment_tau": -1.0}, r"field 'logit_adjustment_tau':\s+ValueError: .*finite number >= 0"),
        ({"logit_adjustment_tau": float("nan")}, r"field 'logit_adjustment_tau':\s+ValueError: .*>= 0, got nan"),
        ({"logit_adjustment_tau": 0.5}, r"`logit_adjustment_tau=0.5` needs `class_prior`"),
        ({"class_prior": [0.5, -0.5]}, r"field 'class_prior':\s+ValueError: .*finite numbers > 0"),
        ({"class_prior": [0.5, float("inf")]}, r"field 'class_prior':\s+ValueError: .*finite numbers > 0"),
        ({"class_prior": [True, False]}, r"field 'class_prior':\s+TypeError"),
        ({"class_prior": [0.2, 0.8], "num_labels": 4}, r"one frequency per label \(num_labels=4\), got 2"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(StrictDataclassError, match=match):
        make_config(**overrides)


def test_config_round_trips_through_save_pretrained(tmp_path):
    labels = {0: "alpha", 1: "beta", 2: "delta"}
    config = make_config(id2label=labels, class_prior=[0.6, 0.3, 0.1], logit_adjustment_tau=1, pooling="mean_max")
    assert (config.num_labels, config.class_prior, config.logit_adjustment_tau) == (3, [0.6, 0.3, 0.1], 1)
    assert (make_config().class_prior, make_config().logit_adjustment_tau) == (None, 0.0)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is ScBert2Config and loaded.to_diff_dict() == config.to_diff_dict()
    assert (loaded.id2label, loaded.class_prior, loaded.logit_adjustment_tau) == (labels, [0.6, 0.3, 0.1], 1)
    assert (loaded.head_dim, loaded.pooling) == (8, "mean_max")


def test_config_logit_adjustment_on_a_masked_regression_folder(tmp_path):
    make_config().save_pretrained(tmp_path)  # class_prior None, the default two labels
    labels = {i: f"type {i}" for i in range(4)}
    config = ScBert2Config.from_pretrained(tmp_path, num_labels=4, id2label=labels)
    assert config.num_labels == 4 and config.id2label == labels and config.class_prior is None
    config.class_prior, config.logit_adjustment_tau = [4, 3, 2, 1], 0.5
    config.validate()
    with pytest.raises(StrictDataclassError, match=r"field 'logit_adjustment_tau'"):
        config.logit_adjustment_tau = -0.5  # one field: checked on assignment
    config.class_prior = [0.5, 0.5]
    with pytest.raises(StrictDataclassError, match=r"num_labels=4\), got 2"):
        config.save_pretrained(tmp_path / "mismatched")  # across fields: checked by validate(), on save


def test_config_defaults_and_presets():
    config = make_config(hidden_size=48, num_attention_heads=4, head_dim=16)
    assert config.head_dim == 16 and config.moe_intermediate_size == config.intermediate_size
    assert make_config().head_dim == 8
    assert make_config(num_local_experts=1).moe_layer_indices == []  # 1 expert is dense
    assert make_config(num_local_experts=4).moe_layer_indices == [0, 1]
    assert make_config(num_experts=4).num_local_experts == 4  # Mixtral's alias
    assert set(PRESETS) == {"scbert2-tiny", "scbert2-small", "scbert2-moe"}
    with pytest.raises(ValueError, match="scbert2-moe.*scbert2-small.*scbert2-tiny"):
        ScBert2Config.from_preset("scbert2-huge")
    small = ScBert2Config.from_preset("scbert2-small", vocab_size=VOCAB)
    moe = ScBert2Config.from_preset("scbert2-moe", vocab_size=VOCAB, num_hidden_layers=2)
    assert moe.num_hidden_layers == 2 and moe.moe_layer_indices == [0, 1]
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"):
        assert getattr(small, key) == getattr(moe, key)
    # Same compute per token: top-k experts of moe_intermediate_size == one dense FFN.
    assert moe.num_experts_per_tok * moe.moe_intermediate_size == small.intermediate_size


def test_moe_preset_parameter_budget():
    dense = ScBert2Model(ScBert2Config.from_preset("scbert2-small", vocab_size=VOCAB))
    moe = ScBert2Model(ScBert2Config.from_preset("scbert2-moe", vocab_size=VOCAB))
    dense_ffn = sum(p.numel() for layer in dense.layers for p in layer.mlp.parameters())
    experts = sum(p.numel() for layer in moe.layers for p in layer.mlp.experts.parameters())
    one_expert = sum(p.numel() for p in moe.layers[0].mlp.experts[0].parameters())
    assert experts == 4 * dense_ffn  # 8 experts of half the dense width
    active_ffn = moe.config.num_hidden_layers * moe.config.num_experts_per_tok * one_expert
    assert active_ffn == dense_ffn


# ----------------------------------------------------------------------------------------------- torch.compile
def compiled_inference_and_training_step(experts, **compile_kwargs):
    model = make_model(ScBert2ForMaskedRegression, "sdpa", num_local_experts=experts)
    batch = collate(make_cells([5, 9]))
    batch["labels"] = torch.where(batch["attention_mask"].bool(), batch["bin_ids"], -100)
    batch["value_labels"] = batch["values"]
    with torch.no_grad():
        reference = model(**batch)
    torch._dynamo.reset()
    compiled = torch.compile(model, **compile_kwargs)
    with torch.no_grad():
        out = compiled(**batch)
    torch.testing.assert_close(out.bin_logits, reference.bin_logits, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(out.loss, reference.loss, atol=ATOL, rtol=ATOL)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.bin_head.weight.detach().clone()
    loss = compiled(**batch).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(model.bin_head.weight, before)


def test_torch_compile_dense_model_is_one_graph():
    # aot_eager traces forward and backward like inductor without generating code (~5 s instead of ~15-100 s);
    # fullgraph=True: the dense model has no graph break.
    compiled_inference_and_training_step(0, backend="aot_eager", fullgraph=True)


@pytest.mark.slow
@pytest.mark.parametrize("experts", [0, 4])
def test_torch_compile_inductor(experts):
    # Measured on 2 busy cores: 13-100 s (dense) and 26-95 s (MoE: graph breaks at the data-dependent expert dispatch).
    compiled_inference_and_training_step(experts)


# ----------------------------------------------------------------------------------------------- real cells
def test_forward_on_baron_cells(baron):
    tokenization = pytest.importorskip("tokenization")
    if not hasattr(tokenization, "GeneExpressionTokenizer"):
        pytest.skip("tokenization.GeneExpressionTokenizer is not available yet")
    tok = tokenization.GeneExpressionTokenizer.from_adata(baron, mode="scbert2")
    batch = tok(baron[:8], return_tensors="pt")
    assert {"input_ids", "values", "attention_mask"} <= set(batch.keys())
    model = make_model(ScBert2ForMaskedRegression, "sdpa", vocab_size=len(tok), num_local_experts=4)
    value_mask = (torch.rand(batch["input_ids"].shape, generator=torch.Generator().manual_seed(0)) < 0.15)
    value_mask &= batch["attention_mask"].bool() & (batch["input_ids"] != model.config.cls_token_id)
    labels = torch.where(value_mask, batch["bin_ids"], -100)
    out = model(**batch, value_mask=value_mask, labels=labels, value_labels=batch["values"])
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss)
    assert out.bin_logits.shape[:2] == batch["input_ids"].shape
    classifier = make_model(ScBert2ForSequenceClassification, "sdpa", vocab_size=len(tok), num_labels=5)
    assert torch.isfinite(classifier(**batch).logits).all()

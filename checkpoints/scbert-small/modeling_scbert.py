"""The original scBERT (Yang et al., 2022) as transformers models: a Performer encoder with FAVOR+ attention.

The attention is a re-implementation of performer-pytorch 1.0.6 (the library scBERT vendors), with the same math, so
published checkpoints convert exactly (see `convert_scbert_original_checkpoint.py`):

- queries and keys are mapped to positive random features `exp(w.x - |x|^2 / 2)` (the softmax kernel) with `w` the
  rows of a gaussian orthogonal random matrix, stored as a buffer so it is saved with the weights;
- attention is linear in the sequence length: `phi(Q) (phi(K)^T V)` normalised by `phi(Q) phi(K)^T 1`;
- during training the random features are redrawn every `config.feature_redraw_interval` forward calls.

As in the original, the key features are stabilised by the maximum over the *whole* key tensor (every cell, head and
position of the batch). It cancels in the attention except through the kernel's additive epsilon, so outputs depend
very slightly on the other cells of the batch; a single cell reproduces the original exactly.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

from .configuration_common import map_every_auto_class
from .configuration_scbert import ScBertConfig

# Added to every random feature (performer-pytorch's default) so the attention normaliser never reaches zero.
KERNEL_EPS = 1e-4


def gaussian_orthogonal_random_matrix(nb_rows: int, nb_columns: int) -> torch.Tensor:
    """FAVOR+ projection [nb_rows, nb_columns]: blocks of orthonormal rows, each row rescaled to the norm of a gaussian
    vector, so every row is marginally gaussian while rows within a block stay orthogonal (lower kernel variance)."""
    blocks = []
    for start in range(0, nb_rows, nb_columns):
        # QR runs on the CPU, as in performer-pytorch: it is tiny and not implemented on every device.
        q, _ = torch.linalg.qr(torch.randn(nb_columns, nb_columns))
        blocks.append(q.T[: nb_rows - start])
    row_norms = torch.randn(nb_rows, nb_columns).norm(dim=1)
    return row_norms[:, None] * torch.cat(blocks)


def softmax_kernel(
    x: torch.Tensor, projection_matrix: torch.Tensor, is_query: bool, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Positive random features of queries or keys [batch, heads, seq, dim_head] -> [batch, heads, seq, nb_features].

    `key_mask` ([batch, seq], True = real token) zeroes padded keys, which removes them from both the numerator and
    the normaliser of the attention, and keeps them out of the key stabiliser.
    """
    # dim_head ** -0.25 on both queries and keys gives the softmax's 1/sqrt(dim_head) temperature.
    normalizer = x.shape[-1] ** -0.25
    ratio = projection_matrix.shape[0] ** -0.5
    projected = torch.matmul(normalizer * x, projection_matrix.type_as(x).T)  # [batch, heads, seq, nb_features]
    half_sq_norm = (x**2).sum(dim=-1, keepdim=True) / 2.0 * normalizer**2  # [batch, heads, seq, 1]
    # Subtracting a maximum before exp avoids overflow: per row for queries (cancels in the row's normalisation),
    # one scalar for keys (cancels between numerator and normaliser). Both shifts are [.., seq, 1], so they are added
    # before touching the large [.., seq, nb_features] tensor: one pass over it instead of two.
    if is_query:
        stabiliser = projected.amax(dim=-1, keepdim=True)
    elif key_mask is None:
        stabiliser = projected.amax()
    else:
        stabiliser = projected.masked_fill(~key_mask[:, None, :, None], float("-inf")).amax()
    features = ratio * (torch.exp(projected - (half_sq_norm + stabiliser)) + KERNEL_EPS)
    if key_mask is not None:
        features = features * key_mask[:, None, :, None]
    return features


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal FAVOR+ attention from features q, k [batch, heads, seq, nb_features] and values v
    [batch, heads, seq, dim_head]; never builds the seq x seq attention matrix."""
    normaliser = torch.matmul(q, k.sum(dim=-2).unsqueeze(-1))  # [batch, heads, seq, 1]
    context = torch.matmul(k.transpose(-1, -2), v)  # [batch, heads, nb_features, dim_head]
    return torch.matmul(q, context) / normaliser


class ScBertEmbeddings(nn.Module):
    """Expression-bin embedding plus the frozen per-gene (gene2vec) positional table."""

    def __init__(self, config: ScBertConfig):
        super().__init__()
        self.token_embeddings = nn.Embedding(config.num_tokens, config.dim)
        # A buffer, not a parameter: scBERT freezes gene2vec, and a buffer cannot be caught by an optimizer by mistake.
        position_embeddings = torch.empty(config.max_seq_len, config.dim) if config.use_gene2vec else None
        self.register_buffer("position_embeddings", position_embeddings)
        self.dropout = nn.Dropout(config.emb_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeddings = self.token_embeddings(input_ids)
        if self.position_embeddings is not None:
            embeddings = embeddings + self.position_embeddings[: input_ids.shape[1]]
        return self.dropout(embeddings)


class ScBertAttention(nn.Module):
    """Multi-head FAVOR+ self-attention (scBERT's `SelfAttention` without local heads)."""

    def __init__(self, config: ScBertConfig):
        super().__init__()
        self.config = config
        self.heads = config.heads
        self.dim_head = config.dim_head
        inner_dim = config.heads * config.dim_head
        self.q_proj = nn.Linear(config.dim, inner_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.dim, inner_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.dim, inner_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(inner_dim, config.dim)
        self.dropout = nn.Dropout(config.attn_dropout)
        self.register_buffer("projection_matrix", torch.empty(config.nb_features, config.dim_head))

    @torch.no_grad()
    def redraw_projection_matrix(self) -> None:
        new_matrix = gaussian_orthogonal_random_matrix(self.config.nb_features, self.dim_head)
        self.projection_matrix.copy_(new_matrix)

    def forward(self, hidden_states: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        # [batch, seq, heads * dim_head] -> [batch, heads, seq, dim_head]
        q, k, v = (
            proj(hidden_states).view(batch, seq_len, self.heads, self.dim_head).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        q = softmax_kernel(q, self.projection_matrix, is_query=True)
        k = softmax_kernel(k, self.projection_matrix, is_query=False, key_mask=key_mask)
        out = linear_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, seq_len, -1)  # [batch, seq, heads * dim_head]
        return self.dropout(self.o_proj(out))


class ScBertMLP(nn.Module):
    def __init__(self, config: ScBertConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.dim, config.dim * config.ff_mult)
        self.fc2 = nn.Linear(config.dim * config.ff_mult, config.dim)
        self.dropout = nn.Dropout(config.ff_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(hidden_states))))


class ScBertLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm residual block: attention, then feed-forward."""

    def __init__(self, config: ScBertConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.attention = ScBertAttention(config)
        self.ffn_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.mlp = ScBertMLP(config)

    def forward(self, hidden_states: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = hidden_states + self.attention(self.attention_norm(hidden_states), key_mask)
        return hidden_states + self.mlp(self.ffn_norm(hidden_states))


class ScBertPreTrainedModel(PreTrainedModel):
    config_class = ScBertConfig
    config: ScBertConfig
    base_model_prefix = "scbert"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ScBertLayer"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:  # this file is copied into the folder as remote code
            map_every_auto_class(self.config, __name__, ScBertModel, ScBertForMaskedLM, ScBertForSequenceClassification)
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) and std is None:
            module.reset_parameters()  # PyTorch's defaults, as performer-pytorch
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, ScBertEmbeddings) and module.position_embeddings is not None:
            # Only a stand-in, at the bin embeddings' scale so neither drowns the other: real checkpoints carry
            # gene2vec (see `load_gene2vec`), and training from scratch loads a co-expression SVD of its cells.
            nn.init.normal_(module.position_embeddings, mean=0.0, std=1.0 if std is None else std)
        elif isinstance(module, ScBertAttention):
            module.redraw_projection_matrix()
        elif isinstance(module, ScBertModel):
            nn.init.zeros_(module.calls_since_last_redraw)

    @torch.no_grad()
    def load_gene2vec(self, table) -> None:
        """Copies a gene2vec table (numpy array or tensor) into the frozen positional embeddings.

        `table` is [max_seq_len, dim], or [max_seq_len - 1, dim] (one row per gene, like scBERT's
        gene2vec_16906.npy), in which case a zero row is appended for the trailing extra token, as scBERT does.
        """
        position_embeddings = self.base_model.embeddings.position_embeddings
        if position_embeddings is None:
            raise ValueError("This model was built with use_gene2vec=False and has no positional table.")
        table = torch.as_tensor(table)
        max_seq_len, dim = position_embeddings.shape
        if tuple(table.shape) == (max_seq_len - 1, dim):
            table = torch.cat([table, table.new_zeros(1, dim)])
        if tuple(table.shape) != (max_seq_len, dim):
            raise ValueError(
                f"gene2vec table must be [{max_seq_len}, {dim}] or [{max_seq_len - 1}, {dim}], "
                f"got {list(table.shape)}."
            )
        position_embeddings.copy_(table)


class ScBertModel(ScBertPreTrainedModel):
    """The scBERT encoder. Input: one expression-bin token per vocabulary gene, in vocabulary order, plus the
    trailing extra token; gene identity is the position."""

    def __init__(self, config: ScBertConfig):
        super().__init__(config)
        self.embeddings = ScBertEmbeddings(config)
        self.layers = nn.ModuleList([ScBertLayer(config) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        # Saved with the weights (as performer-pytorch does) so resumed training keeps the redraw schedule.
        self.register_buffer("calls_since_last_redraw", torch.zeros((), dtype=torch.long))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.token_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.token_embeddings = value

    def redraw_projection_matrices(self) -> None:
        """Draws new random features in every layer."""
        for layer in self.layers:
            layer.attention.redraw_projection_matrix()

    def _maybe_redraw_projection_matrices(self) -> None:
        """performer-pytorch's schedule: count training calls; on the call after `feature_redraw_interval` of them,
        redraw and restart the count."""
        if not self.training or self.config.feature_redraw_interval is None:
            return
        if self.calls_since_last_redraw >= self.config.feature_redraw_interval:
            self.redraw_projection_matrices()
            self.calls_since_last_redraw.zero_()
        else:
            self.calls_since_last_redraw += 1

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Expression-bin tokens (`0..num_tokens - 1`), one per vocabulary gene plus the trailing extra token.
        attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            1 for real tokens, 0 for padding; padded positions are removed as attention keys. A full-panel batch is
            all ones.
        kwargs:
            Other tokenizer outputs (`values`, `bin_ids`, ...) are accepted and ignored, so `model(**batch)` works.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        _, seq_len = input_ids.shape
        if self.config.use_gene2vec and seq_len > self.config.max_seq_len:
            raise ValueError(
                f"Input has {seq_len} tokens but the model holds {self.config.max_seq_len} positions "
                "(vocabulary genes + 1)."
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.num_tokens):
            raise ValueError(
                f"input_ids must be expression bins in [0, {self.config.num_tokens}); got values in "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]. scBERT takes bin tokens, not gene ids "
                '(use the tokenizer with mode="scbert").'
            )

        self._maybe_redraw_projection_matrices()
        # A full panel is all ones: skipping the mask then saves two passes over the key features.
        key_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()

        hidden_states = self.embeddings(input_ids)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, key_mask)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm(hidden_states)

        output = BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states)
        return output if return_dict else output.to_tuple()


class ScBertForMaskedLM(ScBertPreTrainedModel):
    """scBERT's pretraining model: predicts the expression bin of every position."""

    def __init__(self, config: ScBertConfig):
        super().__init__(config)
        self.scbert = ScBertModel(config)
        self.lm_head = nn.Linear(config.dim, config.num_tokens)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Original bins of the masked positions; -100 elsewhere (ignored by the loss).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.scbert(
            input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states, return_dict=True
        )
        logits = self.lm_head(outputs.last_hidden_state)

        loss = None
        if labels is not None:
            # [batch, seq, num_tokens] -> [batch * seq, num_tokens]
            loss = F.cross_entropy(logits.view(-1, self.config.num_tokens), labels.view(-1), ignore_index=-100)

        output = MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return output if return_dict else output.to_tuple()


class ScBertConvClassificationHead(nn.Module):
    """scBERT's fine-tuning head (`Identity` in finetune.py): a 1 x dim convolution scores each gene, then an MLP
    over the full panel of gene scores."""

    def __init__(self, config: ScBertConfig):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, (1, config.dim))
        self.fc1 = nn.Linear(config.max_seq_len, config.classifier_fc1_size)
        self.fc2 = nn.Linear(config.classifier_fc1_size, config.classifier_fc2_size)
        self.fc3 = nn.Linear(config.classifier_fc2_size, config.num_labels)
        self.dropout = nn.Dropout(config.classifier_dropout)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if hidden_states.shape[1] != self.fc1.in_features:
            raise ValueError(
                f'classifier_type="conv" needs the full panel of {self.fc1.in_features} tokens, '
                f'got {hidden_states.shape[1]}; use classifier_type="pooled" for other lengths.'
            )
        # [batch, seq, dim] -> [batch, 1, seq, dim] -> conv -> [batch, 1, seq, 1]
        gene_scores = F.relu(self.conv1(hidden_states.unsqueeze(1)))
        gene_scores = gene_scores.flatten(1)  # [batch, seq]
        x = self.dropout(F.relu(self.fc1(gene_scores)))
        x = self.dropout(F.relu(self.fc2(x)))
        return self.fc3(x)


class ScBertPooledClassificationHead(nn.Module):
    """Mean of the real (unpadded) tokens, then one linear layer; works for any input length."""

    def __init__(self, config: ScBertConfig):
        super().__init__()
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.out_proj = nn.Linear(config.dim, config.num_labels)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            pooled = hidden_states.mean(dim=1)
        else:
            weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)  # [batch, seq, 1]
            pooled = (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.out_proj(self.dropout(pooled))


def adjust_logits(logits: torch.Tensor, config) -> torch.Tensor:
    """Post-hoc logit adjustment (Menon et al. 2021): + tau * log(training class prior), as recorded in the config."""
    if not config.logit_adjustment_tau:
        return logits
    log_prior = torch.tensor(config.class_prior, dtype=torch.float32, device=logits.device).log()
    return logits + (config.logit_adjustment_tau * log_prior).to(logits.dtype)


CLASSIFICATION_HEADS = {"conv": ScBertConvClassificationHead, "pooled": ScBertPooledClassificationHead}


class ScBertForSequenceClassification(ScBertPreTrainedModel):
    """scBERT with a cell-level head (cell-type annotation); `config.classifier_type` picks the head."""

    def __init__(self, config: ScBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.scbert = ScBertModel(config)
        self.classifier = CLASSIFICATION_HEADS[config.classifier_type](config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices (cross-entropy), float targets when `num_labels == 1` (MSE), or multi-hot floats for
            `problem_type="multi_label_classification"` (BCE with logits).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.scbert(
            input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states, return_dict=True
        )
        logits = adjust_logits(self.classifier(outputs.last_hidden_state, attention_mask), self.config)

        loss = None
        if labels is not None:
            # transformers' shared loss: problem type inferred from num_labels and the labels' dtype
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)

        output = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return output if return_dict else output.to_tuple()


__all__ = [
    "ScBertPreTrainedModel",
    "ScBertModel",
    "ScBertForMaskedLM",
    "ScBertForSequenceClassification",
]

# Copyright 2025 The scbert-hf authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""scBERT 2.0: a bidirectional encoder over the expressed genes of a cell.

A cell is a set of (gene, expression value) tokens, so there is no positional embedding: each token's input is its
gene embedding plus an embedding of its value (xTrimoGene/scFoundation auto-discretisation, or scBERT's expression
bins). The encoder follows Llama (pre-norm RMSNorm, SwiGLU FFN, grouped-query attention) without the causal mask,
and Mixtral for the optional sparse mixture-of-experts FFN.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask, packed_sequence_mask_function
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm, eager_attention_forward
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_common import map_every_auto_class
from .configuration_scbert2 import ScBert2Config


class ScBert2RMSNorm(LlamaRMSNorm):
    """Llama's RMSNorm (variance in float32, learned scale)."""


def packed_cu_seq_lens(
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.LongTensor | None,
    cu_seq_lens_q: torch.Tensor | None,
) -> torch.Tensor | None:
    """The cell boundaries [num_cells + 1] of a packed row, or None for a padded batch.

    A batch is packed (padding-free, cells concatenated into one row) when it carries `cu_seq_lens_q` or
    `position_ids`, as transformers' `DataCollatorWithFlattening` builds it; without `cu_seq_lens_q` the boundaries are
    where `position_ids` restart.
    """
    if cu_seq_lens_q is None and position_ids is None:
        return None
    if attention_mask is not None or input_ids.shape[0] != 1:
        raise ValueError(
            "`position_ids` / `cu_seq_lens_q` mark a packed batch: all cells concatenated into one row of shape "
            f"[1, total_tokens] with no `attention_mask`; got input_ids of shape {tuple(input_ids.shape)} and "
            f"attention_mask={'given' if attention_mask is not None else None}. Pass either a padded batch with its "
            "attention_mask or a packed row (tokenizer.collate(cells, packed=True))."
        )
    if cu_seq_lens_q is None:
        (cu_seq_lens_q, _), _ = prepare_fa_kwargs_from_position_ids(position_ids)
    if not torch.compiler.is_compiling() and int(cu_seq_lens_q[-1]) != input_ids.shape[1]:
        raise ValueError(
            f"cu_seq_lens_q ends at {int(cu_seq_lens_q[-1])} but the packed row holds {input_ids.shape[1]} tokens."
        )
    return cu_seq_lens_q


def packed_segment_ids(cu_seq_lens: torch.Tensor, num_tokens: int) -> torch.LongTensor:
    """The index of the cell each token of a packed row belongs to, [num_tokens]: i where cu[i] <= t < cu[i + 1]."""
    token_index = torch.arange(num_tokens, device=cu_seq_lens.device, dtype=cu_seq_lens.dtype)
    return torch.searchsorted(cu_seq_lens[1:], token_index, right=True)


class ScBert2MLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, config: ScBert2Config, intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ScBert2SparseMoeBlock(nn.Module):
    """Top-k routed mixture of SwiGLU experts (Mixtral), with the top-k weights renormalised to sum to 1.

    Tokens are dispatched per expert with `index_select` / `index_add_`, looping only over the experts that received
    tokens; padding tokens are not sent to any expert.
    """

    def __init__(self, config: ScBert2Config):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(
            [ScBert2MLP(config, config.moe_intermediate_size) for _ in range(self.num_experts)]
        )

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [N, E], renormalised top-k weights [N, k] (float32) and expert indices [N, k]."""
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        top_k_weights, top_k_index = torch.topk(routing_weights, self.top_k, dim=-1)
        top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return router_logits, top_k_weights, top_k_index

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, hidden_dim)  # [B, L, H] -> [B*L, H]
        router_logits, top_k_weights, top_k_index = self.route(hidden_states)

        with torch.no_grad():
            # [B*L, k, E] -> [E, k, B*L]: expert_mask[e, j, n] is 1 if token n's j-th choice is expert e
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            if token_mask is not None:
                expert_mask = expert_mask * token_mask.reshape(1, 1, -1).to(expert_mask.dtype)  # [B, L] -> [1, 1, B*L]
            expert_hit = torch.nonzero(expert_mask.sum(dim=(1, 2))).flatten().tolist()

        final_hidden_states = torch.zeros_like(hidden_states)
        for expert_idx in expert_hit:
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            expert_output = self.experts[expert_idx](hidden_states.index_select(0, token_idx))
            expert_output = expert_output * top_k_weights[token_idx, top_k_pos, None].to(expert_output.dtype)
            final_hidden_states.index_add_(0, token_idx, expert_output)
        final_hidden_states = final_hidden_states.reshape(batch_size, seq_len, hidden_dim)  # [B*L, H] -> [B, L, H]
        return final_hidden_states, router_logits


class ScBert2Attention(nn.Module):
    """Bidirectional grouped-query self-attention (no rotary embedding: the genes of a cell have no order)."""

    def __init__(self, config: ScBert2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`kwargs`: for a packed row, `position_ids` and the FlashAttentionKwargs (`cu_seq_lens_q/k`,
        `max_length_q/k`) that make flash attention run its varlen kernel cell by cell."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        # [B, L, heads * D] -> [B, L, heads, D] -> [B, heads, L, D]
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # [B, L, heads, D] -> [B, L, heads * D]
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class ScBert2EncoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)); the FFN is dense or a sparse MoE."""

    def __init__(self, config: ScBert2Config, layer_idx: int):
        super().__init__()
        self.self_attn = ScBert2Attention(config, layer_idx)
        self.is_moe = layer_idx in config.moe_layer_indices
        self.mlp = ScBert2SparseMoeBlock(config) if self.is_moe else ScBert2MLP(config)
        self.input_layernorm = ScBert2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = ScBert2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        residual = hidden_states
        hidden_states, _ = self.self_attn(self.input_layernorm(hidden_states), attention_mask=attention_mask, **kwargs)
        hidden_states = residual + self.dropout(hidden_states)

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        router_logits = None
        if self.is_moe:
            hidden_states, router_logits = self.mlp(hidden_states, token_mask=token_mask)
        else:
            hidden_states = self.mlp(hidden_states)
        hidden_states = residual + self.dropout(hidden_states)
        return hidden_states, router_logits


class ScBert2AutoDiscretizationEmbedding(nn.Module):
    """xTrimoGene / scFoundation value embedding: a soft assignment of a continuous value to learned bins.

    v1 = LeakyReLU(w1 * x + b1); v2 = W2 v1 + b2 + alpha * v1; e = softmax(v2) @ T, with T a [num_value_bins, hidden]
    table.
    """

    def __init__(self, config: ScBert2Config):
        super().__init__()
        self.value_proj = nn.Linear(1, config.num_value_bins)
        self.activation = nn.LeakyReLU(config.value_leaky_relu_slope)
        self.bin_mixer = nn.Linear(config.num_value_bins, config.num_value_bins)
        self.alpha = nn.Parameter(torch.tensor(float(config.value_alpha)))
        self.bin_table = nn.Embedding(config.num_value_bins, config.hidden_size)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        v1 = self.activation(self.value_proj(values.unsqueeze(-1)))  # [B, L] -> [B, L, 1] -> [B, L, bins]
        v2 = self.bin_mixer(v1) + self.alpha * v1
        return F.softmax(v2, dim=-1) @ self.bin_table.weight  # [B, L, bins] @ [bins, H] -> [B, L, H]


class ScBert2Embeddings(nn.Module):
    """Gene embedding + value embedding; learned value embeddings replace the value at masked and padding tokens.

    `attention_mask=None` means there is no padding (a packed row).
    """

    def __init__(self, config: ScBert2Config):
        super().__init__()
        self.config = config
        self.gene_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        if config.value_embedding_type == "auto_discretization":
            self.value_embeddings = ScBert2AutoDiscretizationEmbedding(config)
        else:
            self.value_embeddings = nn.Embedding(config.num_bins + 1, config.hidden_size)
        self.mask_value_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.pad_value_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        values: torch.Tensor | None = None,
        bin_ids: torch.LongTensor | None = None,
        value_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.config.value_embedding_type == "auto_discretization":
            if values is None:
                raise ValueError("`values` (continuous expression, FloatTensor [B, L]) is required with "
                                 "value_embedding_type='auto_discretization'.")
            value_embeds = self.value_embeddings(values.to(self.mask_value_embedding.dtype))
        else:
            if bin_ids is None:
                raise ValueError("`bin_ids` (LongTensor [B, L] in 0..num_bins) is required with "
                                 "value_embedding_type='bin'.")
            value_embeds = self.value_embeddings(bin_ids)
        # [B, L] -> [B, L, 1] masks select per token between [B, L, H] embeddings and a broadcast [H] vector
        if value_mask is not None:
            value_embeds = torch.where(value_mask.bool().unsqueeze(-1), self.mask_value_embedding, value_embeds)
        if attention_mask is not None:
            value_embeds = torch.where(attention_mask.bool().unsqueeze(-1), value_embeds, self.pad_value_embedding)
        return self.dropout(self.gene_embeddings(input_ids) + value_embeds)


class ScBert2PreTrainedModel(PreTrainedModel):
    config_class = ScBert2Config
    config: ScBert2Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ScBert2EncoderLayer"]
    _input_embed_layer = "gene_embeddings"
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": ScBert2EncoderLayer,
        "attentions": ScBert2Attention,
    }

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:  # this file is copied into the folder as remote code
            map_every_auto_class(
                self.config, __name__, ScBert2Model, ScBert2ForMaskedRegression, ScBert2ForSequenceClassification
            )
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, ScBert2Embeddings):
            init.normal_(module.mask_value_embedding, mean=0.0, std=std)
            init.normal_(module.pad_value_embedding, mean=0.0, std=std)
        elif isinstance(module, ScBert2AutoDiscretizationEmbedding):
            init.constant_(module.alpha, self.config.value_alpha)
        elif isinstance(module, ScBert2ForDrugSynergy):
            init.zeros_(module.cell_embedding_mean)
            init.ones_(module.cell_embedding_std)
        elif isinstance(module, ScBert2ForPerturbationPrediction):
            init.normal_(module.knockout_embedding, mean=0.0, std=std)
            init.zeros_(module.output_bias)
            init.zeros_(module.knockout_self_effect)

    def load_gene_embeddings(self, embeddings: torch.Tensor | np.ndarray, freeze: bool = False) -> None:
        """Initialise the gene embedding from an external matrix (e.g. gene2vec, ESM or GenePT gene vectors).

        `embeddings` is either [vocab_size, hidden_size] (one row per token id) or [vocab_size - 3, hidden_size] (one
        row per gene, in vocabulary order after the pad/mask/cls tokens, which keep their own initialisation). With
        `freeze=True` the gene embedding is not trained.
        """
        weight = self.get_input_embeddings().weight
        embeddings = torch.as_tensor(embeddings, dtype=weight.dtype, device=weight.device)
        vocab_size, hidden_size = weight.shape
        special_ids = (self.config.pad_token_id, self.config.mask_token_id, self.config.cls_token_id)
        num_genes = vocab_size - (max(special_ids) + 1)  # the genes follow the special tokens
        rows = embeddings.shape[0] if embeddings.ndim == 2 else None
        if embeddings.ndim != 2 or embeddings.shape[1] != hidden_size or rows not in (vocab_size, num_genes):
            raise ValueError(
                f"Gene embedding matrix has shape {tuple(embeddings.shape)}; expected ({vocab_size}, {hidden_size}) "
                f"(vocab_size, hidden_size) or ({num_genes}, {hidden_size}) (genes only, without the special tokens)."
            )
        with torch.no_grad():
            weight[vocab_size - rows :].copy_(embeddings)
            weight[self.config.pad_token_id].zero_()
        weight.requires_grad_(not freeze)


@dataclass
class ScBert2ModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Final hidden states, after the last RMSNorm; `(1, total_tokens, hidden_size)` for a packed row.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
            The embeddings and the output of every layer.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True` (eager)):
            Attention probabilities of every layer, `(batch_size, num_heads, sequence_length, sequence_length)`.
        router_logits (`tuple(torch.FloatTensor)`, *optional*, returned with `output_router_logits=True`):
            Router logits of every MoE layer, `(batch_size * sequence_length, num_experts)`.
        aux_loss (`torch.FloatTensor`, *optional*, MoE models only):
            Switch-style load-balancing loss over the non-padding tokens (unweighted).
    """

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None


class ScBert2Model(ScBert2PreTrainedModel):
    def __init__(self, config: ScBert2Config):
        super().__init__(config)
        self.embeddings = ScBert2Embeddings(config)
        self.layers = nn.ModuleList(
            [ScBert2EncoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = ScBert2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def padding_mask(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The attention mask of a padded batch: None without padding; for eager and sdpa a key-padding mask
        [B, 1, 1, L] that broadcasts over the queries (sdpa: bool, eager: additive), which on CPU runs sdpa ~1.6x
        faster per layer than the [B, 1, L, L] mask `create_bidirectional_mask` expands to at 2,048 tokens
        (benchmarks/profile_scbert2.py); other backends get transformers' mask."""
        implementation = self.config._attn_implementation
        if implementation not in ("eager", "sdpa"):
            return create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states,
                                             attention_mask=attention_mask)
        if not torch.compiler.is_compiling() and bool(attention_mask.all()):
            return None
        keep = attention_mask.bool()[:, None, None, :]  # [B, L] -> [B, 1, 1, L]
        if implementation == "sdpa":
            return keep
        return torch.zeros(keep.shape, dtype=hidden_states.dtype, device=hidden_states.device).masked_fill(
            ~keep, torch.finfo(hidden_states.dtype).min
        )

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor,
        values: torch.Tensor | None = None,
        bin_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        value_mask: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        max_length_q: int | None = None,
        **kwargs,
    ) -> ScBert2ModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): gene token ids, right-padded;
                or `(1, total_tokens)` for a packed row.
            values (`torch.FloatTensor` of shape `(batch_size, sequence_length)`): log-normalised expression.
            bin_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): expression bins 0..num_bins.
            attention_mask (`torch.LongTensor` of shape `(batch_size, sequence_length)`): 1 for real tokens, 0 for
                padding; defaults to `input_ids != pad_token_id`.
            value_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`): True where the value is hidden
                (masked regression); those tokens get the learned mask value embedding.
            output_router_logits (`bool`, *optional*): return the router logits of every MoE layer.
            position_ids (`torch.LongTensor` of shape `(1, total_tokens)`, *optional*): packed row only: each token's
                index in its cell, restarting at 0 per cell (the model has no positional embedding: they only mark
                the cells).
            cu_seq_lens_q (`torch.IntTensor` of shape `(num_cells + 1,)`, *optional*): packed row only: the cell
                boundaries (0, end of cell 1, ..., total_tokens); derived from `position_ids` when not given.
            max_length_q (`int`, *optional*): packed row only: the longest cell; derived when not given.
            kwargs: `output_hidden_states`, `output_attentions`, `return_dict`; other keys (e.g. `cu_seq_lens_k`,
                `max_length_k`, equal to the `_q` ones in self-attention) are ignored.

        A packed row (`tokenizer.collate(cells, packed=True)`) has no padding: flash attention runs its varlen kernel
        per cell from `cu_seq_lens`; eager / sdpa / flex_attention get a block-diagonal mask (cells attend only within
        themselves); an attention function registered with `AttentionInterface` gets no mask and the boundaries.
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        cu_seq_lens = packed_cu_seq_lens(input_ids, attention_mask, position_ids, cu_seq_lens_q)

        if cu_seq_lens is None:
            if attention_mask is None:
                attention_mask = (input_ids != self.config.pad_token_id).long()
            hidden_states = self.embeddings(
                input_ids, attention_mask, values=values, bin_ids=bin_ids, value_mask=value_mask
            )
            bidirectional_mask = self.padding_mask(hidden_states, attention_mask)
            token_mask = attention_mask.bool()
            attention_kwargs = {}
        else:
            # Every token of a packed row is real: no pad embedding, all tokens routed and counted in the aux loss.
            hidden_states = self.embeddings(input_ids, None, values=values, bin_ids=bin_ids, value_mask=value_mask)
            token_mask = None
            # flash_attention_* and custom kernels get None here (they separate the cells by cu_seq_lens); eager,
            # sdpa and flex get a block-diagonal [1, 1, T, T] mask so that no token attends to another cell.
            segment_ids = packed_segment_ids(cu_seq_lens, input_ids.shape[1])
            bidirectional_mask = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=hidden_states,
                attention_mask=None,
                and_mask_function=packed_sequence_mask_function(segment_ids.unsqueeze(0)),  # [T] -> [1, T]
            )
            if max_length_q is None:
                max_length_q = int(cu_seq_lens.diff().max())
            # Self-attention: keys and queries share the boundaries. Passing all four lets flash attention take its
            # varlen path directly, without inferring the boundaries from position_ids again in every layer.
            attention_kwargs = {
                "position_ids": position_ids,
                "cu_seq_lens_q": cu_seq_lens,
                "cu_seq_lens_k": cu_seq_lens,
                "max_length_q": max_length_q,
                "max_length_k": max_length_q,
            }

        all_router_logits = []
        for encoder_layer in self.layers:
            hidden_states, router_logits = encoder_layer(
                hidden_states, attention_mask=bidirectional_mask, token_mask=token_mask, **attention_kwargs
            )
            if router_logits is not None:
                all_router_logits.append(router_logits)
        hidden_states = self.norm(hidden_states)

        aux_loss = None
        if all_router_logits:
            aux_loss = load_balancing_loss_func(
                tuple(all_router_logits),
                self.config.num_local_experts,
                self.config.num_experts_per_tok,
                attention_mask,
            )
        return ScBert2ModelOutput(
            last_hidden_state=hidden_states,
            router_logits=tuple(all_router_logits) if output_router_logits and all_router_logits else None,
            aux_loss=aux_loss,
        )


@dataclass
class MaskedRegressionOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor`, *optional*, returned with `labels` or `value_labels`):
            `bin_loss_weight * bin_loss + value_loss_weight * value_loss + router_aux_loss_coef * aux_loss`.
        bin_loss (`torch.FloatTensor`, *optional*): cross-entropy of the bin predictions at the masked tokens.
        value_loss (`torch.FloatTensor`, *optional*): mean squared error of the value predictions at the masked tokens.
        aux_loss (`torch.FloatTensor`, *optional*): MoE load-balancing loss (unweighted).
        bin_logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, num_bins + 1)`).
        value_predictions (`torch.FloatTensor` of shape `(batch_size, sequence_length)`).
        hidden_states, attentions, router_logits: as in [`ScBert2ModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    bin_loss: torch.FloatTensor | None = None
    value_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    bin_logits: torch.FloatTensor | None = None
    value_predictions: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


class ScBert2ForMaskedRegression(ScBert2PreTrainedModel):
    """Masked expression modelling: predict the bin (cross-entropy) and the value (MSE) of the hidden tokens."""

    def __init__(self, config: ScBert2Config):
        super().__init__(config)
        self.model = ScBert2Model(config)
        self.bin_head = nn.Linear(config.hidden_size, config.num_bins + 1)
        self.value_head = nn.Linear(config.hidden_size, 1)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor,
        values: torch.Tensor | None = None,
        bin_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        value_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        value_labels: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MaskedRegressionOutput:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): bin targets in
                0..num_bins at the masked tokens, -100 elsewhere.
            value_labels (`torch.FloatTensor` of shape `(batch_size, sequence_length)`, *optional*): value targets,
                scored where `labels != -100` (or where `value_mask` is True when `labels` is not given).
            Other arguments: as in [`ScBert2Model.forward`].
        """
        outputs: ScBert2ModelOutput = self.model(
            input_ids,
            values=values,
            bin_ids=bin_ids,
            attention_mask=attention_mask,
            value_mask=value_mask,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        sequence_output = outputs.last_hidden_state
        bin_logits = self.bin_head(sequence_output)
        value_predictions = self.value_head(sequence_output).squeeze(-1)  # [B, L, 1] -> [B, L]

        loss = bin_loss = value_loss = None
        if labels is not None:
            num_targets = (labels != -100).sum().clamp(min=1)
            bin_loss = F.cross_entropy(
                bin_logits.reshape(-1, self.config.num_bins + 1).float(),  # [B, L, C] -> [B*L, C]
                labels.reshape(-1),  # [B, L] -> [B*L]
                ignore_index=-100,
                reduction="sum",
            ) / num_targets
            loss = self.config.bin_loss_weight * bin_loss
        if value_labels is not None:
            if labels is not None:
                targets = labels != -100
            elif value_mask is not None:
                targets = value_mask.bool()
            else:
                raise ValueError("`value_labels` needs `labels` (-100 where not scored) or `value_mask` to know "
                                 "which tokens to score.")
            squared_error = (value_predictions.float() - value_labels.float()) ** 2
            value_loss = torch.where(targets, squared_error, 0.0).sum() / targets.sum().clamp(min=1)
            weighted = self.config.value_loss_weight * value_loss
            loss = weighted if loss is None else loss + weighted
        if loss is not None and outputs.aux_loss is not None:
            loss = loss + self.config.router_aux_loss_coef * outputs.aux_loss

        return MaskedRegressionOutput(
            loss=loss,
            bin_loss=bin_loss,
            value_loss=value_loss,
            aux_loss=outputs.aux_loss,
            bin_logits=bin_logits,
            value_predictions=value_predictions,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )


@dataclass
class ScBert2SequenceClassifierOutput(SequenceClassifierOutput):
    """[`~modeling_outputs.SequenceClassifierOutput`] plus the MoE `aux_loss` and `router_logits`, and
    `pooled_output` `(num_cells, pooled_size)`: the cell embedding the classifier reads."""

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    pooled_output: torch.FloatTensor | None = None


def adjust_logits(logits: torch.Tensor, config) -> torch.Tensor:
    """Post-hoc logit adjustment (Menon et al. 2021): + tau * log(training class prior), as recorded in the config."""
    if not config.logit_adjustment_tau:
        return logits
    log_prior = torch.tensor(config.class_prior, dtype=torch.float32, device=logits.device).log()
    return logits + (config.logit_adjustment_tau * log_prior).to(logits.dtype)


def pooled_size(config: ScBert2Config) -> int:
    """Width of a [`pool_cells`] cell embedding."""
    return 2 * config.hidden_size if config.pooling == "mean_max" else config.hidden_size


def pool_cells(
    config: ScBert2Config,
    last_hidden_state: torch.Tensor,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    cu_seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """One vector per cell from the encoder's last hidden states: the CLS token (`pooling="cls"`), the mean over the
    cell's non-padding gene tokens (`"mean"`), or that mean next to their elementwise maximum (`"mean_max"`, twice
    the width).

    Padded batch: [B, L, H] -> [B, H] (or [B, 2H]). Packed row with boundaries `cu_seq_lens` [N + 1]:
    [1, T, H] -> [N, H] (or [N, 2H]).
    """
    if cu_seq_lens is None:
        first_ids, first_states = input_ids[:, 0], last_hidden_state[:, 0]
    else:
        cell_starts = cu_seq_lens[:-1].long()
        first_ids, first_states = input_ids[0, cell_starts], last_hidden_state[0, cell_starts]
    if config.pooling == "cls":
        if not torch.compiler.is_compiling() and not bool((first_ids == config.cls_token_id).all()):
            raise ValueError(
                f"pooling='cls' needs the CLS token (id {config.cls_token_id}) at position 0 of every cell; "
                "tokenize with add_cls_token=True or use pooling='mean'."
            )
        return first_states
    lowest = torch.finfo(last_hidden_state.dtype).min
    if cu_seq_lens is not None:
        # Per-cell sums and maxima by scattering each token into its cell's row; CLS tokens take no part.
        token_states = last_hidden_state[0]  # [1, T, H] -> [T, H]
        gene_mask = (input_ids[0] != config.cls_token_id).unsqueeze(-1)  # [1, T] -> [T] -> [T, 1]
        segment_ids = packed_segment_ids(cu_seq_lens, token_states.shape[0])
        num_cells = cu_seq_lens.shape[0] - 1
        summed = token_states.new_zeros(num_cells, token_states.shape[-1]).index_add(
            0, segment_ids, torch.where(gene_mask, token_states, 0.0)
        )
        counts = token_states.new_zeros(num_cells, 1).index_add(0, segment_ids, gene_mask.to(token_states.dtype))
        if config.pooling == "mean_max":
            maxima = token_states.new_full((num_cells, token_states.shape[-1]), lowest).index_reduce(
                0, segment_ids, torch.where(gene_mask, token_states, lowest), "amax"
            )
    else:
        if attention_mask is None:
            attention_mask = input_ids != config.pad_token_id
        gene_mask = (attention_mask.bool() & (input_ids != config.cls_token_id)).unsqueeze(-1)  # [B, L, 1]
        summed = torch.where(gene_mask, last_hidden_state, 0.0).sum(dim=1)
        counts = gene_mask.sum(dim=1).to(summed.dtype)
        if config.pooling == "mean_max":
            maxima = torch.where(gene_mask, last_hidden_state, lowest).amax(dim=1)
    mean = summed / counts.clamp(min=1)
    if config.pooling == "mean":
        return mean
    maxima = torch.where(counts > 0, maxima, 0.0)  # a cell without gene tokens pools to zeros, as its mean does
    return torch.cat([mean, maxima], dim=-1)  # [N, H] + [N, H] -> [N, 2H]


def pool_expression(
    config: ScBert2Config,
    gene_table: torch.Tensor,
    input_ids: torch.LongTensor,
    values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cu_seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """A cell's expression read through the gene table: the sum over its gene tokens of value x gene vector (a cell
    without gene tokens gives zeros). Special tokens and padding take no part.

    Padded batch: [B, L] -> [B, H]. Packed row with boundaries `cu_seq_lens` [N + 1]: [1, T] -> [N, H].
    """
    # Comparisons rather than torch.isin, which exports to ONNX through an op it has no kernel for (searchsorted).
    gene_mask = (input_ids != config.pad_token_id) & (input_ids != config.mask_token_id) & (
        input_ids != config.cls_token_id)
    if attention_mask is not None:
        gene_mask &= attention_mask.bool()
    # F.embedding rather than gene_table[input_ids]: on CPU the indexing's backward sums a gene's gradient with
    # atomic adds in thread order, so two identical runs of fine-tuning drifted apart from the first step.
    genes = F.embedding(input_ids, gene_table)  # [B, L] -> [B, L, H]
    weighted = torch.where(gene_mask, values, 0.0).unsqueeze(-1).to(gene_table.dtype) * genes
    if cu_seq_lens is None:
        return weighted.sum(dim=1)  # [B, L, H] -> [B, H]
    segment_ids = packed_segment_ids(cu_seq_lens, input_ids.shape[1])
    return weighted.new_zeros(cu_seq_lens.shape[0] - 1, weighted.shape[-1]).index_add(0, segment_ids, weighted[0])


class ScBert2ForSequenceClassification(ScBert2PreTrainedModel):
    """Cell-level classification or regression from the CLS token or the mean over the gene tokens; with
    `config.expression_pooling`, also from the cell's expression read through the gene table ([`pool_expression`],
    RMS-normalised: its scale does not depend on how many genes a cell expresses or gene dropout left)."""

    def __init__(self, config: ScBert2Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = ScBert2Model(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        width = pooled_size(config)
        if config.expression_pooling:
            self.expression_norm = ScBert2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            width += config.hidden_size
        self.classifier = nn.Linear(width, config.num_labels)
        self.post_init()

    def pool(
        self,
        last_hidden_state: torch.Tensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        cu_seq_lens: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The cell embedding the classifier reads: [`pool_cells`] with this model's `config.pooling`, then, with
        `config.expression_pooling`, the normalised [`pool_expression`] of `values`."""
        pooled = pool_cells(self.config, last_hidden_state, input_ids, attention_mask, cu_seq_lens)
        if not self.config.expression_pooling:
            return pooled
        if values is None:
            raise ValueError("expression_pooling=True reads the cells' continuous expression: pass `values` "
                             "(FloatTensor shaped like input_ids), as the tokenizer returns it.")
        gene_table = self.get_input_embeddings().weight
        expression = pool_expression(self.config, gene_table, input_ids, values, attention_mask, cu_seq_lens)
        return torch.cat([pooled, self.expression_norm(expression)], dim=-1)  # [N, P] + [N, H] -> [N, P + H]

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor,
        values: torch.Tensor | None = None,
        bin_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        **kwargs,
    ) -> ScBert2SequenceClassifierOutput:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): class ids for single-label
                classification, float targets for regression (`num_labels == 1`) or multi-hot floats for
                multi-label classification, following `config.problem_type` as in transformers. One per cell also
                for a packed row, whose logits are `(num_cells, num_labels)`.
            Other arguments: as in [`ScBert2Model.forward`].
        """
        # Resolved here too (not only in the model): pooling needs the cell boundaries, even from position_ids alone.
        cu_seq_lens = packed_cu_seq_lens(input_ids, attention_mask, position_ids, cu_seq_lens_q)
        outputs: ScBert2ModelOutput = self.model(
            input_ids,
            values=values,
            bin_ids=bin_ids,
            attention_mask=attention_mask,
            output_router_logits=output_router_logits,
            position_ids=position_ids,
            cu_seq_lens_q=cu_seq_lens,
            **kwargs,
        )
        pooled_output = self.pool(outputs.last_hidden_state, input_ids, attention_mask, cu_seq_lens, values)
        logits = adjust_logits(self.classifier(self.dropout(pooled_output)), self.config)

        loss = None
        if labels is not None:
            # transformers' shared loss: problem type inferred from num_labels and the labels' dtype
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
            if outputs.aux_loss is not None:
                loss = loss + self.config.router_aux_loss_coef * outputs.aux_loss

        return ScBert2SequenceClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_loss=outputs.aux_loss,
            router_logits=outputs.router_logits,
            pooled_output=pooled_output,
        )


@dataclass
class DrugSynergyOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned with `labels`):
            Mean squared error of the predicted synergy scores.
        predictions (`torch.FloatTensor` of shape `(batch_size,)`):
            The predicted synergy score of each (drug A, drug B, cell line) row.
        cell_embeddings (`torch.FloatTensor` of shape `(batch_size, pooled_size)`):
            The cell line's embedding the prediction read (pooled encoder output, or the one passed in).
        drug_embeddings (`tuple(torch.FloatTensor)`):
            Drug A's and drug B's vectors, each `(batch_size, synergy_hidden_size)`.
    """

    loss: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None
    cell_embeddings: torch.FloatTensor | None = None
    drug_embeddings: tuple[torch.FloatTensor, torch.FloatTensor] | None = None


class ScBert2DrugEncoder(nn.Module):
    """A drug as one vector: its Morgan fingerprint and the mean gene embedding of its known target genes."""

    def __init__(self, config: ScBert2Config):
        super().__init__()
        self.fingerprint_proj = nn.Linear(config.drug_fingerprint_size, config.synergy_hidden_size)
        self.target_proj = nn.Linear(config.hidden_size, config.synergy_hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, fingerprints: torch.Tensor, target_embeddings: torch.Tensor) -> torch.Tensor:
        # [B, F] and [B, H] -> [B, S]
        return self.act_fn(self.fingerprint_proj(fingerprints) + self.target_proj(target_embeddings))


class ScBert2CellEmbeddingHead(ScBert2PreTrainedModel):
    """Shared by the task heads that read one pooled embedding per cell from the encoder (`self.model`), which a
    frozen-encoder training run computes once and passes in as `cell_embeddings`."""

    def embed_cells(
        self, input_ids: torch.LongTensor, values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, bin_ids: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """Pooled encoder output of tokenized cells (padded batch): [B, L] -> [B, pooled_size]."""
        outputs = self.model(input_ids, values=values, bin_ids=bin_ids, attention_mask=attention_mask)
        return pool_cells(self.config, outputs.last_hidden_state, input_ids, attention_mask)

    def cell_embeddings(self, input_ids, values, attention_mask, cell_embeddings) -> torch.Tensor:
        """The precomputed embeddings when given, else those of the tokenized cells."""
        if cell_embeddings is not None:
            return cell_embeddings
        if input_ids is None:
            raise ValueError("Pass the cells either tokenized (input_ids, values) or as cell_embeddings.")
        return self.embed_cells(input_ids, values=values, attention_mask=attention_mask)


class ScBert2ForDrugSynergy(ScBert2CellEmbeddingHead):
    """Synergy score of a drug pair on a cell line: the cell line through the encoder (pooled as
    `config.pooling`), each drug through [`ScBert2DrugEncoder`] (its targets read from the encoder's gene table), the
    pair as the sum and the elementwise product of the two drug vectors, so swapping A and B cannot change the
    prediction."""

    def __init__(self, config: ScBert2Config):
        super().__init__(config)
        self.model = ScBert2Model(config)
        self.drug_encoder = ScBert2DrugEncoder(config)
        self.cell_proj = nn.Linear(pooled_size(config), config.synergy_hidden_size)
        self.act_fn = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.hidden_layers = nn.ModuleList(
            nn.Linear((3 if i == 0 else 1) * config.synergy_hidden_size, config.synergy_hidden_size)
            for i in range(config.synergy_num_hidden_layers)
        )
        self.score_proj = nn.Linear(config.synergy_hidden_size, 1)
        # Pooled embeddings of different cell lines share one dominant direction (cosine similarity 0.99998 between
        # O'Neil's 35 lines from the pretrained encoder), so the head reads them standardised per dimension, with the
        # statistics of the training cell lines (`set_cell_statistics`), saved with the weights.
        self.register_buffer("cell_embedding_mean", torch.zeros(pooled_size(config)))
        self.register_buffer("cell_embedding_std", torch.ones(pooled_size(config)))
        self.post_init()

    @torch.no_grad()
    def set_cell_statistics(self, cell_embeddings: torch.Tensor) -> None:
        """Standardise cell embeddings with the mean and standard deviation of these [N, pooled_size] embeddings."""
        if cell_embeddings.shape[0] < 2:
            raise ValueError(f"Cell statistics need at least 2 cell embeddings, got {cell_embeddings.shape[0]}.")
        self.cell_embedding_mean.copy_(cell_embeddings.mean(dim=0))
        self.cell_embedding_std.copy_(cell_embeddings.std(dim=0).clamp(min=1e-6))

    def target_embeddings(self, target_ids: torch.LongTensor) -> torch.Tensor:
        """Mean gene embedding of each drug's target genes, right-padded with `pad_token_id`; zeros for a drug
        without targets: [B, T] -> [B, H]."""
        known = (target_ids != self.config.pad_token_id).unsqueeze(-1)  # [B, T] -> [B, T, 1]
        embedded = self.model.embeddings.gene_embeddings(target_ids)  # [B, T] -> [B, T, H]
        return torch.where(known, embedded, 0.0).sum(dim=1) / known.sum(dim=1).clamp(min=1)

    def forward(
        self,
        drug_a_fingerprints: torch.Tensor,
        drug_a_target_ids: torch.LongTensor,
        drug_b_fingerprints: torch.Tensor,
        drug_b_target_ids: torch.LongTensor,
        input_ids: torch.LongTensor | None = None,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cell_embeddings: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> DrugSynergyOutput:
        r"""
        Args:
            drug_a_fingerprints, drug_b_fingerprints (`torch.FloatTensor` of shape `(batch_size, drug_fingerprint_size)`):
                Morgan fingerprint bits of each row's two drugs (all zeros for a drug known only by its targets).
            drug_a_target_ids, drug_b_target_ids (`torch.LongTensor` of shape `(batch_size, num_targets)`):
                Gene token ids of each drug's known targets, right-padded with `pad_token_id`.
            input_ids, values, attention_mask: the cell line of each row, tokenized (see [`ScBert2Model.forward`]).
            cell_embeddings (`torch.FloatTensor` of shape `(batch_size, pooled_size)`, *optional*): instead of the
                tokenized cell line, its [`embed_cells`] output computed once (the encoder is frozen in training).
            labels (`torch.FloatTensor` of shape `(batch_size,)`, *optional*): observed synergy scores.
        """
        cell_embeddings = self.cell_embeddings(input_ids, values, attention_mask, cell_embeddings)
        drug_a = self.drug_encoder(drug_a_fingerprints, self.target_embeddings(drug_a_target_ids))
        drug_b = self.drug_encoder(drug_b_fingerprints, self.target_embeddings(drug_b_target_ids))
        # [B, S] each -> [B, 3S]: the cell next to two symmetric functions of the pair
        cells = (cell_embeddings - self.cell_embedding_mean) / self.cell_embedding_std
        features = torch.cat([self.act_fn(self.cell_proj(cells)), drug_a + drug_b, drug_a * drug_b], dim=-1)
        hidden = self.dropout(features)
        for layer in self.hidden_layers:
            hidden = self.dropout(self.act_fn(layer(hidden)))  # [B, 3S] -> [B, S] -> ... [B, S]
        predictions = self.score_proj(hidden).squeeze(-1)  # [B, 1] -> [B]

        loss = None
        if labels is not None:
            loss = F.mse_loss(predictions, labels.to(predictions.dtype))
        return DrugSynergyOutput(
            loss=loss, predictions=predictions, cell_embeddings=cell_embeddings, drug_embeddings=(drug_a, drug_b)
        )


@dataclass
class PerturbationOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned with `labels`):
            Mean squared error of the predicted perturbed expression over the output genes.
        predictions (`torch.FloatTensor` of shape `(batch_size, num_output_genes)`):
            Predicted log2 expression of `config.perturbation_gene_ids` after the perturbation: the control cell's
            expression plus `deltas`.
        deltas (`torch.FloatTensor` of shape `(batch_size, num_output_genes)`):
            The predicted change.
        cell_embeddings (`torch.FloatTensor` of shape `(batch_size, pooled_size)`):
            The control cell's embedding the prediction read.
    """

    loss: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None
    deltas: torch.FloatTensor | None = None
    cell_embeddings: torch.FloatTensor | None = None


class ScBert2ForPerturbationPrediction(ScBert2CellEmbeddingHead):
    """Expression of a control cell after a single-gene knock-out. The target enters as its gene token (the gene
    table's row, whether or not the gene is measured) plus a learned knock-out embedding; the change of each output
    gene is the dot product of a hidden state of (cell, perturbation) with a projection of that gene's own row of the
    gene table, so output genes and unseen targets both draw on the pretrained gene embeddings."""

    def __init__(self, config: ScBert2Config):
        super().__init__(config)
        if not config.perturbation_gene_ids:
            raise ValueError("ScBert2ForPerturbationPrediction needs `config.perturbation_gene_ids`: the token ids of "
                             "the genes it predicts (the measured panel).")
        self.model = ScBert2Model(config)
        width = config.synergy_hidden_size
        self.knockout_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.perturbation_proj = nn.Linear(config.hidden_size, width)
        self.cell_proj = nn.Linear(pooled_size(config), width)
        self.act_fn = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.hidden_proj = nn.Linear(2 * width, width)
        self.output_gene_proj = nn.Linear(config.hidden_size, width)
        self.output_bias = nn.Parameter(torch.empty(len(config.perturbation_gene_ids)))
        # A knock-out's first effect is on its own target: where the target is an output gene, that gene's
        # expression is scaled by (1 + knockout_self_effect) on top of the learned change, for any target.
        self.knockout_self_effect = nn.Parameter(torch.empty(()))
        self.post_init()

    def forward(
        self,
        perturbation_ids: torch.LongTensor,
        control_expression: torch.Tensor,
        input_ids: torch.LongTensor | None = None,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cell_embeddings: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> PerturbationOutput:
        r"""
        Args:
            perturbation_ids (`torch.LongTensor` of shape `(batch_size,)`): gene token id of each cell's knocked-out
                target.
            control_expression (`torch.FloatTensor` of shape `(batch_size, num_output_genes)`): the control cell's
                log2 expression of `config.perturbation_gene_ids` (0 where not expressed).
            input_ids, values, attention_mask: the control cell, tokenized (see [`ScBert2Model.forward`]).
            cell_embeddings (`torch.FloatTensor` of shape `(batch_size, pooled_size)`, *optional*): instead of the
                tokenized cell, its [`embed_cells`] output computed once (the encoder is frozen in training).
            labels (`torch.FloatTensor` of shape `(batch_size, num_output_genes)`, *optional*): observed perturbed
                log2 expression (e.g. the perturbation's mean profile).
        """
        cell_embeddings = self.cell_embeddings(input_ids, values, attention_mask, cell_embeddings)
        gene_table = self.model.embeddings.gene_embeddings
        perturbation = self.act_fn(self.perturbation_proj(gene_table(perturbation_ids) + self.knockout_embedding))
        cell = self.act_fn(self.cell_proj(cell_embeddings))
        # [B, S] + [B, S] -> [B, 2S] -> [B, S]
        hidden = self.dropout(self.act_fn(self.hidden_proj(self.dropout(torch.cat([cell, perturbation], dim=-1)))))
        output_ids = torch.tensor(self.config.perturbation_gene_ids, device=perturbation_ids.device)
        output_genes = self.output_gene_proj(gene_table(output_ids))  # [G] -> [G, H] -> [G, S]
        deltas = hidden @ output_genes.T + self.output_bias  # [B, S] x [S, G] -> [B, G]
        is_target = output_ids.unsqueeze(0) == perturbation_ids.unsqueeze(1)  # [1, G] vs [B, 1] -> [B, G]
        deltas = deltas + torch.where(is_target, self.knockout_self_effect * control_expression, 0.0)
        predictions = control_expression + deltas

        loss = None
        if labels is not None:
            loss = F.mse_loss(predictions, labels.to(predictions.dtype))
        return PerturbationOutput(loss=loss, predictions=predictions, deltas=deltas, cell_embeddings=cell_embeddings)


__all__ = [
    "DrugSynergyOutput",
    "MaskedRegressionOutput",
    "ScBert2CellEmbeddingHead",
    "ScBert2DrugEncoder",
    "ScBert2ForDrugSynergy",
    "PerturbationOutput",
    "ScBert2ForMaskedRegression",
    "ScBert2ForPerturbationPrediction",
    "ScBert2ForSequenceClassification",
    "ScBert2Model",
    "ScBert2ModelOutput",
    "ScBert2PreTrainedModel",
    "ScBert2SequenceClassifierOutput",
]

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
"""scBERT 2.0 configuration: a bidirectional Llama/Mixtral-style encoder over the expressed genes of a cell."""

from typing import Any, ClassVar

from transformers import PretrainedConfig

VALUE_EMBEDDING_TYPES = ("auto_discretization", "bin")
POOLING_TYPES = ("cls", "mean", "mean_max")

# Named architectures. `scbert2-moe` is `scbert2-small` with every FFN replaced by 8 experts of half the dense width,
# top-2 routing: the compute per token matches the dense model, the FFN parameters are 8 x 1/2 = 4 x the dense FFN.
PRESETS: dict[str, dict[str, Any]] = {
    "scbert2-tiny": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "num_value_bins": 16,
    },
    "scbert2-small": {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 512,
        "num_value_bins": 100,
    },
    "scbert2-moe": {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 512,
        "moe_intermediate_size": 256,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "num_value_bins": 100,
    },
}


class ScBert2Config(PretrainedConfig):
    r"""
    Configuration of scBERT 2.0: a pre-norm bidirectional transformer (RMSNorm, SwiGLU or sparse mixture-of-experts
    FFN, grouped-query attention, no positional embedding) whose tokens are the expressed genes of a cell. A token's
    input is its gene embedding plus an embedding of its expression value.

    Args:
        vocab_size (`int`): number of gene tokens including the special tokens (pad, mask, cls).
        hidden_size (`int`): width of the residual stream.
        num_hidden_layers (`int`): number of encoder layers.
        num_attention_heads (`int`): query heads per layer.
        num_key_value_heads (`int`): key/value heads (grouped-query attention); 1 is multi-query attention and
            `num_attention_heads` is multi-head attention. Must divide `num_attention_heads`.
        head_dim (`int`, *optional*): per-head width; defaults to `hidden_size // num_attention_heads`.
        intermediate_size (`int`): width of the dense SwiGLU FFN.
        moe_intermediate_size (`int`, *optional*): width of each expert's SwiGLU FFN; defaults to `intermediate_size`.
        hidden_act (`str`): activation of the SwiGLU gate.
        rms_norm_eps (`float`): epsilon of the RMSNorms.
        attention_dropout (`float`): dropout on the attention probabilities.
        hidden_dropout (`float`): dropout on the embeddings and on each residual branch.
        initializer_range (`float`): standard deviation of the normal weight initialisation.
        pad_token_id, mask_token_id, cls_token_id (`int`): special token ids; genes start after them.
        value_embedding_type (`str`): `"auto_discretization"` (xTrimoGene/scFoundation soft binning of the continuous
            value) or `"bin"` (an embedding of the scBERT-style bin id).
        num_value_bins (`int`): rows of the auto-discretisation table.
        value_leaky_relu_slope (`float`): negative slope of the auto-discretisation LeakyReLU.
        value_alpha (`float`): initial weight of the auto-discretisation skip connection.
        num_bins (`int`): scBERT expression bins; bin ids are 0..num_bins, so `num_bins + 1` classes.
        num_local_experts (`int`): experts per MoE FFN; 0 or 1 means every FFN is dense.
        num_experts_per_tok (`int`): experts each token is routed to (top-k).
        router_aux_loss_coef (`float`): weight of the Switch-style load-balancing loss in the training loss.
        moe_layers (`list[int]`, *optional*): indices of the layers whose FFN is a MoE; `None` means all of them when
            `num_local_experts > 1`.
        output_router_logits (`bool`): whether outputs include the router logits of every MoE layer.
        bin_loss_weight (`float`): weight of the bin cross-entropy in the masked-regression loss.
        value_loss_weight (`float`): weight of the value mean squared error in the masked-regression loss.
        pooling (`str`): `"cls"` (the token at position 0, which must be CLS), `"mean"` (mean over the gene tokens)
            or `"mean_max"` (that mean next to the elementwise maximum over the gene tokens, which keeps a few marker
            genes from being averaged away) for sequence classification.
        classifier_dropout (`float`): dropout before the classification layer.

    Example:

    ```python
    >>> config = ScBert2Config.from_preset("scbert2-moe", vocab_size=14880)
    >>> config.num_local_experts, config.num_experts_per_tok
    (8, 2)
    ```
    """

    model_type = "scbert2"
    attribute_map: ClassVar[dict[str, str]] = {"num_experts": "num_local_experts"}

    vocab_size: int = 20000
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    intermediate_size: int = 512
    moe_intermediate_size: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    initializer_range: float = 0.02
    pad_token_id: int = 0
    mask_token_id: int = 1
    cls_token_id: int = 2
    value_embedding_type: str = "auto_discretization"
    num_value_bins: int = 100
    value_leaky_relu_slope: float = 0.1
    value_alpha: float = 1.0
    num_bins: int = 5
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.01
    moe_layers: list[int] | None = None
    output_router_logits: bool = False
    bin_loss_weight: float = 1.0
    value_loss_weight: float = 1.0
    pooling: str = "cls"
    classifier_dropout: float = 0.1

    def __post_init__(self, **kwargs):
        self._validate()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        super().__post_init__(**kwargs)

    def _validate(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "num_value_bins",
            "num_bins",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        for name in ("head_dim", "moe_intermediate_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer or None, got {getattr(self, name)}.")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads}), or set `head_dim` explicitly."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be divisible by `num_key_value_heads` "
                f"({self.num_key_value_heads}): each key/value head serves a whole group of query heads."
            )
        for name in ("attention_dropout", "hidden_dropout", "classifier_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"`{name}` is a probability and must be in [0, 1), got {getattr(self, name)}.")
        for name in ("rms_norm_eps", "initializer_range"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)}.")
        for name in ("router_aux_loss_coef", "bin_loss_weight", "value_loss_weight", "value_leaky_relu_slope"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.value_embedding_type not in VALUE_EMBEDDING_TYPES:
            raise ValueError(
                f"`value_embedding_type` must be one of {VALUE_EMBEDDING_TYPES}, got {self.value_embedding_type!r}."
            )
        if self.pooling not in POOLING_TYPES:
            raise ValueError(f"`pooling` must be one of {POOLING_TYPES}, got {self.pooling!r}.")
        special = {name: getattr(self, name) for name in ("pad_token_id", "mask_token_id", "cls_token_id")}
        if len(set(special.values())) != len(special):
            raise ValueError(f"The special token ids must be distinct, got {special}.")
        for name, value in special.items():
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"`{name}` must be in [0, vocab_size={self.vocab_size}), got {value}.")
        if self.num_local_experts < 0:
            raise ValueError(f"`num_local_experts` must be >= 0 (0 or 1 means dense), got {self.num_local_experts}.")
        if self.num_local_experts > 1 and not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"`num_experts_per_tok` (top-k) must be in [1, num_local_experts={self.num_local_experts}], "
                f"got {self.num_experts_per_tok}."
            )
        if self.moe_layers is not None:
            if self.num_local_experts <= 1 and len(self.moe_layers) > 0:
                raise ValueError(
                    f"`moe_layers={self.moe_layers}` needs `num_local_experts > 1`, got {self.num_local_experts}."
                )
            outside = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
            if outside:
                raise ValueError(
                    f"`moe_layers` must be layer indices in [0, num_hidden_layers={self.num_hidden_layers}), "
                    f"got {outside} outside that range."
                )
            if len(set(self.moe_layers)) != len(self.moe_layers):
                raise ValueError(f"`moe_layers` must not repeat a layer, got {self.moe_layers}.")

    @property
    def moe_layer_indices(self) -> list[int]:
        """The layers whose FFN is a sparse mixture of experts (empty for a dense model)."""
        if self.num_local_experts <= 1:
            return []
        if self.moe_layers is None:
            return list(range(self.num_hidden_layers))
        return sorted(self.moe_layers)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ScBert2Config":
        """A configuration from one of `PRESETS` (`scbert2-tiny`, `scbert2-small`, `scbert2-moe`), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"Unknown scBERT 2.0 preset {name!r}; expected one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


__all__ = ["PRESETS", "ScBert2Config"]

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

from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .configuration_common import (
    check_logit_adjustment,
    novelty_settings,
    positive_int,
    positive_int_or_none,
    dropout_probability,
    positive_finite,
    non_negative_finite,
    class_frequencies,
)

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


@strict
class ScBert2Config(PreTrainedConfig):
    r"""
    Configuration of scBERT 2.0: a pre-norm bidirectional transformer (RMSNorm, SwiGLU or sparse mixture-of-experts
    FFN, grouped-query attention, no positional embedding) whose tokens are the expressed genes of a cell. A token's
    input is its gene embedding plus an embedding of its expression value.

    Args:
        vocab_size (`int`, defaults to 20000):
            Number of gene tokens including the special tokens (pad, mask, cls).
        hidden_size (`int`, defaults to 128):
            Width of the residual stream.
        num_hidden_layers (`int`, defaults to 4):
            Number of encoder layers.
        num_attention_heads (`int`, defaults to 4):
            Query heads per layer.
        num_key_value_heads (`int`, defaults to 2):
            Key/value heads (grouped-query attention); 1 is multi-query attention and `num_attention_heads` is
            multi-head attention. Must divide `num_attention_heads`.
        head_dim (`int`, *optional*):
            Per-head width; defaults to `hidden_size // num_attention_heads`, which must then divide evenly.
        intermediate_size (`int`, defaults to 512):
            Width of the dense SwiGLU FFN.
        moe_intermediate_size (`int`, *optional*):
            Width of each expert's SwiGLU FFN; defaults to `intermediate_size`.
        hidden_act (`str`, defaults to `"silu"`):
            Activation of the SwiGLU gate.
        rms_norm_eps (`float`, defaults to 1e-6):
            Epsilon of the RMSNorms.
        attention_dropout (`float`, defaults to 0.0):
            Dropout on the attention probabilities.
        hidden_dropout (`float`, defaults to 0.0):
            Dropout on the embeddings and on each residual branch.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal weight initialisation.
        pad_token_id, mask_token_id, cls_token_id (`int`, default to 0, 1, 2):
            Special token ids, distinct and inside the vocabulary; genes start after them.
        value_embedding_type (`str`, defaults to `"auto_discretization"`):
            `"auto_discretization"` (xTrimoGene/scFoundation soft binning of the continuous value) or `"bin"` (an
            embedding of the scBERT-style bin id).
        num_value_bins (`int`, defaults to 100):
            Rows of the auto-discretisation table.
        value_leaky_relu_slope (`float`, defaults to 0.1):
            Negative slope of the auto-discretisation LeakyReLU.
        value_alpha (`float`, defaults to 1.0):
            Initial weight of the auto-discretisation skip connection.
        num_bins (`int`, defaults to 5):
            scBERT expression bins; bin ids are 0..num_bins, so `num_bins + 1` classes.
        num_local_experts (`int`, defaults to 0):
            Experts per MoE FFN; 0 or 1 means every FFN is dense. Also readable as `num_experts` (Mixtral's name).
        num_experts_per_tok (`int`, defaults to 2):
            Experts each token is routed to (top-k), in [1, num_local_experts] for a MoE model.
        router_aux_loss_coef (`float`, defaults to 0.01):
            Weight of the Switch-style load-balancing loss in the training loss.
        moe_layers (`list[int]`, *optional*):
            Indices of the layers whose FFN is a MoE; `None` means all of them when `num_local_experts > 1`.
        output_router_logits (`bool`, defaults to `False`):
            Whether outputs include the router logits of every MoE layer.
        bin_loss_weight (`float`, defaults to 1.0):
            Weight of the bin cross-entropy in the masked-regression loss.
        value_loss_weight (`float`, defaults to 1.0):
            Weight of the value mean squared error in the masked-regression loss.
        pooling (`str`, defaults to `"cls"`):
            Sequence-classification pooling: `"cls"` (the token at position 0, which must be CLS), `"mean"` (mean
            over the gene tokens) or `"mean_max"` (that mean next to the elementwise maximum over the gene tokens,
            which keeps a few marker genes from being averaged away).
        expression_pooling (`bool`, defaults to `False`):
            Sequence classification: the cell vector also holds the cell's expression read through the gene table
            (the sum over its gene tokens of value x gene vector, RMS-normalised). With the SVD gene table that
            fine-tuning starts from, these are the cell's principal components: the linear view of the expression
            that logistic regression gets, beside the encoder's, for data sets with few labelled cells.
        classifier_dropout (`float`, defaults to 0.1):
            Dropout before the classification layer.
        class_prior (`list[float]`, *optional*):
            The training class frequencies, one per label in `id2label` order (counts work as well: only their
            ratios matter). Required when `logit_adjustment_tau > 0`.
        logit_adjustment_tau (`float`, defaults to 0.0):
            Logit adjustment (Menon et al., 2021): the classification head adds
            `logit_adjustment_tau * log(class_prior)` to its logits, so a saved folder predicts the adjusted way
            with no extra code. 0 leaves the logits unchanged; 1 is the balanced-error optimal shift.
        novelty_detection (`dict`, *optional*):
            The open-set detector fitted at fine-tuning time (train/novelty.py): `score`, the novelty score cells are
            flagged by, `thresholds` (score name -> threshold chosen on validation cells of the known types; a cell
            scoring above it is flagged novel) and how they were chosen. Its class statistics are in the folder's
            `novelty.safetensors`.
        drug_fingerprint_size (`int`, defaults to 1024):
            Drug-synergy head: bits of the Morgan fingerprint each drug is given as.
        drug_fingerprint_radius (`int`, defaults to 2):
            Drug-synergy head: radius of that fingerprint (2 is ECFP4), recorded so predictions compute it alike.
        synergy_hidden_size (`int`, defaults to 256):
            Drug-synergy and perturbation heads: width of their hidden layers (drug vectors, projected cell embedding,
            regressor; perturbation vector and the hidden state of cell and perturbation).
        synergy_num_hidden_layers (`int`, defaults to 2):
            Drug-synergy head: hidden layers of the regressor over the cell and drug-pair features.
        perturbation_gene_ids (`list[int]`, *optional*):
            Perturbation head: token ids of the genes whose expression it predicts (the measured panel), in output
            order; required by `ScBert2ForPerturbationPrediction`.

    Example:

    ```python
    >>> config = ScBert2Config.from_preset("scbert2-moe", vocab_size=14880)
    >>> config.num_local_experts, config.num_experts_per_tok
    (8, 2)
    ```
    """

    model_type = "scbert2"
    attribute_map = {"num_experts": "num_local_experts"}

    vocab_size: int = positive_int(default=20000)
    hidden_size: int = positive_int(default=128)
    num_hidden_layers: int = positive_int(default=4)
    num_attention_heads: int = positive_int(default=4)
    num_key_value_heads: int = positive_int(default=2)
    head_dim: int | None = positive_int_or_none(default=None)
    intermediate_size: int = positive_int(default=512)
    moe_intermediate_size: int | None = positive_int_or_none(default=None)
    hidden_act: str = "silu"
    rms_norm_eps: float | int = positive_finite(default=1e-6)
    attention_dropout: float | int = dropout_probability(default=0.0)
    hidden_dropout: float | int = dropout_probability(default=0.0)
    initializer_range: float | int = positive_finite(default=0.02)
    pad_token_id: int = 0
    mask_token_id: int = 1
    cls_token_id: int = 2
    value_embedding_type: Literal["auto_discretization", "bin"] = "auto_discretization"
    num_value_bins: int = positive_int(default=100)
    value_leaky_relu_slope: float | int = non_negative_finite(default=0.1)
    value_alpha: float | int = 1.0
    num_bins: int = positive_int(default=5)
    num_local_experts: int = non_negative_finite(default=0)
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float | int = non_negative_finite(default=0.01)
    moe_layers: list[int] | None = None
    output_router_logits: bool = False
    bin_loss_weight: float | int = non_negative_finite(default=1.0)
    value_loss_weight: float | int = non_negative_finite(default=1.0)
    pooling: Literal["cls", "mean", "mean_max"] = "cls"
    expression_pooling: bool = False
    classifier_dropout: float | int = dropout_probability(default=0.1)
    class_prior: list[float | int] | None = class_frequencies(default=None)
    logit_adjustment_tau: float | int = non_negative_finite(default=0.0)
    novelty_detection: dict | None = novelty_settings(default=None)
    drug_fingerprint_size: int = positive_int(default=1024)
    drug_fingerprint_radius: int = positive_int(default=2)
    synergy_hidden_size: int = positive_int(default=256)
    synergy_num_hidden_layers: int = positive_int(default=2)
    perturbation_gene_ids: list[int] | None = None

    def __post_init__(self, **kwargs):
        # A head_dim that does not divide hidden_size is left unset, for validate_architecture to report.
        if self.head_dim is None and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict`-powered validation: the attention heads must split the widths evenly."""
        if self.head_dim is None:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads}), or set `head_dim` explicitly."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be divisible by `num_key_value_heads` "
                f"({self.num_key_value_heads}): each key/value head serves a whole group of query heads."
            )

    def validate_experts(self):
        """Part of `@strict`-powered validation: top-k routing and the MoE layer indices must fit the model."""
        if self.num_local_experts > 1 and not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"`num_experts_per_tok` (top-k) must be in [1, num_local_experts={self.num_local_experts}], "
                f"got {self.num_experts_per_tok}."
            )
        if self.moe_layers is None:
            return
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

    def validate_token_ids(self):
        """Part of `@strict`-powered validation: the special tokens must be distinct tokens of the vocabulary."""
        special = {name: getattr(self, name) for name in ("pad_token_id", "mask_token_id", "cls_token_id")}
        if len(set(special.values())) != len(special):
            raise ValueError(f"The special token ids must be distinct, got {special}.")
        for name, value in special.items():
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"`{name}` must be in [0, vocab_size={self.vocab_size}), got {value}.")
        genes = self.perturbation_gene_ids
        if genes is not None:
            first_gene = max(special.values()) + 1
            outside = [i for i in genes if not first_gene <= i < self.vocab_size]
            if outside or len(set(genes)) != len(genes):
                raise ValueError(
                    f"`perturbation_gene_ids` must be distinct gene token ids in [{first_gene}, {self.vocab_size}); "
                    f"got {len(genes)} ids, {len(genes) - len(set(genes))} repeated, outside: {outside[:5]}."
                )

    def validate_logit_adjustment(self):
        """Part of `@strict`-powered validation: the adjustment needs a prior, with one frequency per label."""
        check_logit_adjustment(self)

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

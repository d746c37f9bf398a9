"""Configuration of the original scBERT (Yang et al., 2022): a Performer encoder over a fixed gene panel."""

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
    non_negative_finite_or_none,
    class_frequencies,
)

# Named architectures (scBERT 2.0 has its own in configuration_scbert2.py). `scbert` is the published model, i.e. the
# defaults; `scbert-small` keeps its structure at a size that trains in minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "scbert": {},
    "scbert-small": {"dim": 64, "depth": 2, "heads": 4, "dim_head": 16, "nb_features": 64},
}


@strict
class ScBertConfig(PreTrainedConfig):
    r"""
    Configuration for [`ScBertModel`] and its heads. The defaults are the published scBERT (panglao_pretrain.pth).

    Every input is one cell: a token per vocabulary gene in fixed order plus one trailing extra token, the token being
    the gene's expression bin. Gene identity is the position, carried by a frozen gene2vec positional table.

    Args:
        num_tokens (`int`, defaults to 7):
            Token vocabulary: expression bins 0..5 plus the mask/pad token 6 (scBERT's `bin_num + 2`).
        dim (`int`, defaults to 200):
            Hidden size (the gene2vec width).
        depth (`int`, defaults to 6):
            Number of Performer layers.
        heads (`int`, defaults to 10):
            Attention heads per layer.
        dim_head (`int`, defaults to 64):
            Width of each head; the attention inner size is `heads * dim_head`.
        max_seq_len (`int`, defaults to 16907):
            Input length: 16,906 genes plus the trailing extra token.
        nb_features (`int`, defaults to 266):
            Random features of the FAVOR+ softmax kernel (performer-pytorch's `int(dim_head * ln(dim_head))`).
        feature_redraw_interval (`int` or `None`, defaults to 1000):
            Redraw the random features after this many training forward calls; `None` keeps them fixed.
        ff_mult (`int`, defaults to 4):
            Feed-forward (GELU) width as a multiple of `dim`.
        qkv_bias (`bool`, defaults to `False`):
            Whether the query/key/value projections have a bias (scBERT's have none).
        use_gene2vec (`bool`, defaults to `True`):
            Add the frozen positional table (gene2vec in scBERT). Without it the model has no positional signal,
            as scBERT with `g2v_position_emb=False`.
        layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of every LayerNorm.
        emb_dropout, attn_dropout, ff_dropout (`float`, default to 0.0):
            Dropout after the embeddings, the attention output and inside the feed-forward.
        initializer_range (`float`, *optional*):
            `None` (the default) initialises as performer-pytorch, hence scBERT, does: PyTorch's defaults, i.e.
            Kaiming-uniform linear and conv layers and normal(0, 1) bin embeddings. At transformers' usual
            normal(0, 0.02) both the bin embeddings and a random stand-in for the frozen gene2vec table are too
            small for a from-scratch model to tell the cells apart (it learns only the class prior). A number:
            normal(0, `initializer_range`) for all of them.
        classifier_type (`str`, defaults to `"conv"`):
            Sequence-classification head. `"conv"` is scBERT's fine-tuning head (finetune.py `Identity`):
            Conv2d(1, 1, (1, dim)) -> ReLU -> fc1(max_seq_len -> fc1_size) -> ReLU -> dropout -> fc2(-> fc2_size)
            -> ReLU -> dropout -> fc3(-> num_labels); it needs inputs of exactly `max_seq_len` tokens.
            `"pooled"` averages the (unpadded) tokens and applies dropout and one linear layer.
        classifier_fc1_size (`int`, defaults to 512):
            Output width of the conv head's fc1.
        classifier_fc2_size (`int`, defaults to 128):
            Output width of the conv head's fc2 (`h_dim`; finetune.py builds `Identity(h_dim=128)`).
        classifier_dropout (`float`, defaults to 0.0):
            Dropout inside the classification head.
        mask_token_id (`int` or `None`, defaults to 6):
            Token used for masked (and padded) genes in pretraining.
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

    Example:

    ```python
    >>> config = ScBertConfig.from_preset("scbert-small", max_seq_len=2001, num_labels=3)
    >>> config.hidden_size, config.num_hidden_layers, config.num_labels
    (64, 2, 3)
    ```
    """

    model_type = "scbert"
    attribute_map = {
        "hidden_size": "dim",
        "num_hidden_layers": "depth",
        "num_attention_heads": "heads",
        "head_dim": "dim_head",
        "vocab_size": "num_tokens",
        "max_position_embeddings": "max_seq_len",
    }

    num_tokens: int = positive_int(default=7)
    dim: int = positive_int(default=200)
    depth: int = positive_int(default=6)
    heads: int = positive_int(default=10)
    dim_head: int = positive_int(default=64)
    max_seq_len: int = positive_int(default=16907)
    nb_features: int = positive_int(default=266)
    feature_redraw_interval: int | None = positive_int_or_none(default=1000)
    ff_mult: int = positive_int(default=4)
    qkv_bias: bool = False
    use_gene2vec: bool = True
    layer_norm_eps: float | int = positive_finite(default=1e-5)
    emb_dropout: float | int = dropout_probability(default=0.0)
    attn_dropout: float | int = dropout_probability(default=0.0)
    ff_dropout: float | int = dropout_probability(default=0.0)
    initializer_range: float | int | None = non_negative_finite_or_none(default=None)
    classifier_type: Literal["conv", "pooled"] = "conv"
    classifier_fc1_size: int = positive_int(default=512)
    classifier_fc2_size: int = positive_int(default=128)
    classifier_dropout: float | int = dropout_probability(default=0.0)
    mask_token_id: int | None = 6
    class_prior: list[float | int] | None = class_frequencies(default=None)
    logit_adjustment_tau: float | int = non_negative_finite(default=0.0)
    novelty_detection: dict | None = novelty_settings(default=None)

    def validate_token_ids(self):
        """Part of `@strict`-powered validation: the mask token must be a token of the vocabulary."""
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.num_tokens:
            raise ValueError(
                f"`mask_token_id` must be in [0, num_tokens={self.num_tokens}), got {self.mask_token_id}."
            )

    def validate_logit_adjustment(self):
        """Part of `@strict`-powered validation: the adjustment needs a prior, with one frequency per label."""
        check_logit_adjustment(self)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ScBertConfig":
        """A configuration from one of `PRESETS` (`scbert`, `scbert-small`), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"Unknown scBERT preset {name!r}; expected one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


__all__ = ["PRESETS", "ScBertConfig"]

"""Configuration of the original scBERT (Yang et al., 2022): a Performer encoder over a fixed gene panel."""

from transformers import PretrainedConfig

CLASSIFIER_TYPES = ("conv", "pooled")


class ScBertConfig(PretrainedConfig):
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
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal initialisation of linear, conv and embedding weights.
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
        mask_token_id (`int`, defaults to 6):
            Token used for masked (and padded) genes in pretraining.
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

    def __init__(
        self,
        num_tokens=7,
        dim=200,
        depth=6,
        heads=10,
        dim_head=64,
        max_seq_len=16907,
        nb_features=266,
        feature_redraw_interval=1000,
        ff_mult=4,
        qkv_bias=False,
        use_gene2vec=True,
        layer_norm_eps=1e-5,
        emb_dropout=0.0,
        attn_dropout=0.0,
        ff_dropout=0.0,
        initializer_range=0.02,
        classifier_type="conv",
        classifier_fc1_size=512,
        classifier_fc2_size=128,
        classifier_dropout=0.0,
        mask_token_id=6,
        **kwargs,
    ):
        sizes = {
            "num_tokens": num_tokens, "dim": dim, "depth": depth, "heads": heads, "dim_head": dim_head,
            "max_seq_len": max_seq_len, "nb_features": nb_features, "ff_mult": ff_mult,
            "classifier_fc1_size": classifier_fc1_size, "classifier_fc2_size": classifier_fc2_size,
        }
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if feature_redraw_interval is not None and (
            isinstance(feature_redraw_interval, bool)
            or not isinstance(feature_redraw_interval, int)
            or feature_redraw_interval <= 0
        ):
            raise ValueError(
                f"feature_redraw_interval must be a positive integer or None, got {feature_redraw_interval!r}."
            )
        for name, value in {
            "emb_dropout": emb_dropout, "attn_dropout": attn_dropout,
            "ff_dropout": ff_dropout, "classifier_dropout": classifier_dropout,
        }.items():
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}.")
        if layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be positive, got {layer_norm_eps!r}.")
        if initializer_range < 0:
            raise ValueError(f"initializer_range must be non-negative, got {initializer_range!r}.")
        if classifier_type not in CLASSIFIER_TYPES:
            raise ValueError(f"classifier_type must be one of {CLASSIFIER_TYPES}, got {classifier_type!r}.")
        if mask_token_id is not None and not 0 <= mask_token_id < num_tokens:
            raise ValueError(f"mask_token_id must be in [0, num_tokens={num_tokens}), got {mask_token_id!r}.")

        self.num_tokens = num_tokens
        self.dim = dim
        self.depth = depth
        self.heads = heads
        self.dim_head = dim_head
        self.max_seq_len = max_seq_len
        self.nb_features = nb_features
        self.feature_redraw_interval = feature_redraw_interval
        self.ff_mult = ff_mult
        self.qkv_bias = qkv_bias
        self.use_gene2vec = use_gene2vec
        self.layer_norm_eps = layer_norm_eps
        self.emb_dropout = emb_dropout
        self.attn_dropout = attn_dropout
        self.ff_dropout = ff_dropout
        self.initializer_range = initializer_range
        self.classifier_type = classifier_type
        self.classifier_fc1_size = classifier_fc1_size
        self.classifier_fc2_size = classifier_fc2_size
        self.classifier_dropout = classifier_dropout
        self.mask_token_id = mask_token_id
        super().__init__(**kwargs)


__all__ = ["ScBertConfig"]

"""Convert an original scBERT checkpoint (performer-pytorch `PerformerLM`) into a transformers model folder.

    python -m modeling_scbert.convert_scbert_original_checkpoint \
        --checkpoint panglao_pretrain.pth --output scbert-base/ [--gene-list genes.txt]

The checkpoint is scBERT's format: a dict whose "model_state_dict" comes from `model.module.state_dict()` (a
"module." prefix from saving the DDP wrapper itself is tolerated). The architecture is read from the tensor shapes,
so one converter serves every model size. A pretraining checkpoint gives `ScBertForMaskedLM`; a fine-tuned one
(head `to_out.conv1/fc1/fc2/fc3`) gives `ScBertForSequenceClassification` with scBERT's conv head.
"""

import argparse
import re
from pathlib import Path

import torch

from .configuration_scbert import ScBertConfig
from .modeling_scbert import ScBertForMaskedLM, ScBertForSequenceClassification

# performer.net.layers.{i}.0 is PreLayerNorm(SelfAttention), .1 is PreLayerNorm(Chunk(FeedForward)).
LAYER_KEY_MAP = {
    "0.norm": "attention_norm",
    "0.fn.to_q": "attention.q_proj",
    "0.fn.to_k": "attention.k_proj",
    "0.fn.to_v": "attention.v_proj",
    "0.fn.to_out": "attention.o_proj",
    "0.fn.fast_attention.projection_matrix": "attention.projection_matrix",
    "1.norm": "ffn_norm",
    "1.fn.fn.w1": "mlp.fc1",
    "1.fn.fn.w2": "mlp.fc2",
}
TOP_KEY_MAP = {
    "token_emb.weight": "scbert.embeddings.token_embeddings.weight",
    "pos_emb.emb.weight": "scbert.embeddings.position_embeddings",
    "performer.calls_since_last_redraw": "scbert.calls_since_last_redraw",
    "norm.weight": "scbert.norm.weight",
    "norm.bias": "scbert.norm.bias",
}
LAYER_KEY = re.compile(r"^performer\.net\.layers\.(\d+)\.(.+?)(\.weight|\.bias)?$")
CONV_HEAD_MODULES = ("conv1", "fc1", "fc2", "fc3")


def load_original_state_dict(checkpoint_path) -> dict[str, torch.Tensor]:
    """The original state dict, without the "module." prefix of a checkpoint saved from the DDP wrapper."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load reports corrupt or foreign files with assorted exception types
        raise ValueError(f"Could not read {path} as a torch checkpoint ({type(error).__name__}: {error}).") from error
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        found = list(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path} is not an scBERT checkpoint: expected a dict with a 'model_state_dict' entry, found {found}."
        )
    return {key.removeprefix("module."): value for key, value in checkpoint["model_state_dict"].items()}


def infer_config(state_dict: dict[str, torch.Tensor]) -> ScBertConfig:
    """An ScBertConfig whose sizes are read from the tensor shapes."""

    def require(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise ValueError(f"Not an scBERT (Performer) state dict: missing {key!r}.")
        return state_dict[key]

    num_tokens, dim = require("token_emb.weight").shape
    depth = len({int(m.group(1)) for m in map(LAYER_KEY.match, state_dict) if m})
    if depth == 0:
        raise ValueError("Not an scBERT (Performer) state dict: no 'performer.net.layers.*' weights.")
    nb_features, dim_head = require("performer.net.layers.0.0.fn.fast_attention.projection_matrix").shape
    inner_dim = require("performer.net.layers.0.0.fn.to_q.weight").shape[0]
    ff_hidden = require("performer.net.layers.0.1.fn.fn.w1.weight").shape[0]
    if inner_dim % dim_head or ff_hidden % dim:
        raise ValueError(
            f"Shapes do not form an scBERT: attention width {inner_dim} is not a multiple of dim_head {dim_head}, "
            f"or feed-forward width {ff_hidden} not a multiple of dim {dim} (a GLU feed-forward is not supported)."
        )

    head_kwargs = {}
    if "to_out.fc3.weight" in state_dict:
        head_kwargs = {
            "classifier_type": "conv",
            "classifier_fc1_size": require("to_out.fc1.weight").shape[0],
            "classifier_fc2_size": require("to_out.fc2.weight").shape[0],
            "num_labels": state_dict["to_out.fc3.weight"].shape[0],
        }
    if "pos_emb.emb.weight" in state_dict:
        max_seq_len = state_dict["pos_emb.emb.weight"].shape[0]
    elif "to_out.fc1.weight" in state_dict:
        max_seq_len = state_dict["to_out.fc1.weight"].shape[1]
    else:
        raise ValueError(
            "Cannot infer max_seq_len: the checkpoint has neither a gene2vec table ('pos_emb.emb.weight') "
            "nor a conv classification head."
        )

    return ScBertConfig(
        num_tokens=num_tokens,
        dim=dim,
        depth=depth,
        heads=inner_dim // dim_head,
        dim_head=dim_head,
        max_seq_len=max_seq_len,
        nb_features=nb_features,
        ff_mult=ff_hidden // dim,
        qkv_bias="performer.net.layers.0.0.fn.to_q.bias" in state_dict,
        use_gene2vec="pos_emb.emb.weight" in state_dict,
        # pretrain.py: MASK_TOKEN_ID = CLASS - 1, the last token.
        mask_token_id=num_tokens - 1,
        **head_kwargs,
    )


def rename_key(key: str) -> str:
    if key in TOP_KEY_MAP:
        return TOP_KEY_MAP[key]
    if key in ("to_out.weight", "to_out.bias"):
        return "lm_head." + key.removeprefix("to_out.")
    if key.startswith("to_out.") and key.split(".")[1] in CONV_HEAD_MODULES:
        return "classifier." + key.removeprefix("to_out.")
    match = LAYER_KEY.match(key)
    if match and match.group(2) in LAYER_KEY_MAP:
        layer, name, suffix = match.group(1), match.group(2), match.group(3) or ""
        return f"scbert.layers.{layer}.{LAYER_KEY_MAP[name]}{suffix}"
    raise ValueError(
        f"Unexpected key {key!r}: not part of an scBERT model (local attention, GLU and heads other than the MLM "
        "output or the conv classifier are unsupported)."
    )


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renamed tensors in float32 (scBERT stores the gene2vec table as float64)."""
    return {rename_key(key): value.float() if value.is_floating_point() else value for key, value in state_dict.items()}


def convert_checkpoint(checkpoint_path, output_dir, gene_list_path=None):
    """Converts the checkpoint, saves it (and the tokenizer if a gene list is given) and returns the model."""
    state_dict = load_original_state_dict(checkpoint_path)
    config = infer_config(state_dict)
    # Checked before anything is written, so a wrong list leaves no half-converted folder behind.
    genes = read_gene_list(gene_list_path, config.max_seq_len) if gene_list_path is not None else None

    model_class = ScBertForSequenceClassification if "to_out.fc3.weight" in state_dict else ScBertForMaskedLM
    model = model_class(config)
    try:
        missing, unexpected = model.load_state_dict(convert_state_dict(state_dict), strict=False)
    except RuntimeError as error:  # size mismatches between layers
        raise ValueError(f"Shapes do not form an scBERT: {error}") from error
    # A checkpoint saved before any training step may predate the redraw counter; it starts at zero anyway.
    missing = [key for key in missing if key != "scbert.calls_since_last_redraw"]
    if missing or unexpected:
        raise ValueError(
            f"Shapes do not form an scBERT: missing {missing[:5]}, unexpected {unexpected[:5]} after conversion."
        )
    model.eval()
    model.save_pretrained(output_dir)
    if genes is not None:
        # The converter is a script, not Hub remote code, so it may use the project's tokenizer package.
        from tokenization import GeneExpressionTokenizer

        GeneExpressionTokenizer(genes=genes, mode="scbert").save_pretrained(output_dir)
    return model


def read_gene_list(path, max_seq_len: int) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Gene list not found: {path}")
    genes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(genes) != max_seq_len - 1:
        raise ValueError(
            f"The gene list has {len(genes)} genes but the checkpoint has {max_seq_len - 1} "
            f"(max_seq_len {max_seq_len} = genes + 1 trailing token)."
        )
    return genes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="scbert convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="Original scBERT .pth (e.g. panglao_pretrain.pth).")
    parser.add_argument("--output", required=True, help="Folder for the transformers model (safetensors).")
    parser.add_argument("--gene-list", help="Text file, one gene symbol per line in checkpoint order.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    model = convert_checkpoint(args.checkpoint, args.output, args.gene_list)
    print(f"Saved {type(model).__name__} ({model.num_parameters():,} parameters) to {args.output}")


if __name__ == "__main__":
    main()

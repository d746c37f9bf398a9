"""The gene-expression tokenizer of the scBERT family (one tokenizer for every model)."""

from transformers.models.auto.tokenization_auto import REGISTERED_TOKENIZER_CLASSES

from .tokenization_scbert import GeneExpressionTokenizer, GeneMatchReport

# AutoTokenizer resolves the "tokenizer_class" name of tokenizer_config.json through this registry, so once this
# package is imported AutoTokenizer.from_pretrained(folder) finds the class without trust_remote_code.
REGISTERED_TOKENIZER_CLASSES[GeneExpressionTokenizer.__name__] = GeneExpressionTokenizer

__all__ = ["GeneExpressionTokenizer", "GeneMatchReport"]

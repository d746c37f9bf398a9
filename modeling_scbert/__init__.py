"""The scBERT model family; importing this package registers every config and model with transformers' Auto classes."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from .configuration_scbert import ScBertConfig
from .configuration_scbert2 import ScBert2Config
from .modeling_scbert import ScBertForMaskedLM, ScBertForSequenceClassification, ScBertModel, ScBertPreTrainedModel
from .modeling_scbert2 import (
    ScBert2ForDrugSynergy,
    ScBert2ForMaskedRegression,
    ScBert2ForPerturbationPrediction,
    ScBert2ForSequenceClassification,
    ScBert2Model,
    ScBert2PreTrainedModel,
)

_AUTO_CLASSES = {
    ScBertConfig: (ScBertModel, ScBertForMaskedLM, ScBertForSequenceClassification),
    ScBert2Config: (ScBert2Model, ScBert2ForMaskedRegression, ScBert2ForSequenceClassification),
}

for _config, (_base, _masked, _classifier) in _AUTO_CLASSES.items():
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _base, exist_ok=True)
    AutoModelForMaskedLM.register(_config, _masked, exist_ok=True)
    AutoModelForSequenceClassification.register(_config, _classifier, exist_ok=True)
    # save_pretrained then copies the source files into the folder and writes config.json's auto_map (every Auto
    # class, whichever head is saved: see the *PreTrainedModel classes), so the folder loads as remote code.
    _config.register_for_auto_class()
    _base.register_for_auto_class("AutoModel")
    _masked.register_for_auto_class("AutoModelForMaskedLM")
    _classifier.register_for_auto_class("AutoModelForSequenceClassification")

# The task heads without an Auto class of their own: their saved folders carry the model code too, and there
# AutoModel (remote code) loads the head itself; with this package imported, AutoModel stays the encoder.
for _head in (ScBert2ForDrugSynergy, ScBert2ForPerturbationPrediction):
    _head.register_for_auto_class("AutoModel")

__all__ = [
    "ScBertConfig",
    "ScBertModel",
    "ScBertForMaskedLM",
    "ScBertForSequenceClassification",
    "ScBertPreTrainedModel",
    "ScBert2Config",
    "ScBert2Model",
    "ScBert2ForDrugSynergy",
    "ScBert2ForMaskedRegression",
    "ScBert2ForPerturbationPrediction",
    "ScBert2ForSequenceClassification",
    "ScBert2PreTrainedModel",
]

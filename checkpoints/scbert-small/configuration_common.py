"""What both scBERT configurations share: value checks for their fields and the logit-adjustment check.

Imported relatively by configuration_scbert.py and configuration_scbert2.py, so transformers copies it into every
saved folder next to them and Hub remote code finds it.
"""

import math

from huggingface_hub.dataclasses import as_validated_field


# Value checks that `@strict` runs whenever the field is set (at init and on assignment), after the type check.
@as_validated_field
def positive_int(value: int):
    if value <= 0:
        raise ValueError(f"Value must be a positive integer, got {value}.")


@as_validated_field
def positive_int_or_none(value: int | None):
    if value is not None and value <= 0:
        raise ValueError(f"Value must be a positive integer or None, got {value}.")


@as_validated_field
def dropout_probability(value: float):
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Value is a dropout probability and must be in [0, 1), got {value}.")


@as_validated_field
def positive_finite(value: float):
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"Value must be a finite number > 0, got {value}.")


@as_validated_field
def non_negative_finite(value: float):
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"Value must be a finite number >= 0, got {value}.")


@as_validated_field
def non_negative_finite_or_none(value: float | None):
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"Value must be a finite number >= 0 or None, got {value}.")


@as_validated_field
def class_frequencies(value: list[float] | None):
    if value is not None and not (value and all(math.isfinite(p) and p > 0 for p in value)):
        raise ValueError(f"Value must be None or a non-empty list of finite numbers > 0, got {value}.")


@as_validated_field
def novelty_settings(value: dict | None):
    if value is None:
        return
    def finite(t):
        return isinstance(t, (int, float)) and math.isfinite(t)

    thresholds = value.get("thresholds") if isinstance(value, dict) else None
    gate = value.get("gate") if isinstance(value, dict) else None
    if not (isinstance(thresholds, dict) and value.get("score") in thresholds
            and all(finite(t) for t in thresholds.values())
            and (gate is None or (isinstance(gate, dict) and gate.get("score") in thresholds
                                  and finite(gate.get("threshold"))))):
        raise ValueError(
            "Value must be None or a dict with `score` (the novelty score the annotation flags by), `thresholds` "
            "(score name -> finite threshold, holding `score`) and optionally `gate` ({`score`: a score of "
            f"`thresholds`, `threshold`: finite}}), got {value}."
        )


def check_logit_adjustment(config) -> None:
    """The adjustment needs a prior, with one frequency per label (after `__post_init__` has resolved `num_labels`)."""
    if config.logit_adjustment_tau > 0 and config.class_prior is None:
        raise ValueError(
            f"`logit_adjustment_tau={config.logit_adjustment_tau}` needs `class_prior` (the training class "
            "frequencies), got None."
        )
    if config.class_prior is not None and config.num_labels is not None and len(config.class_prior) != config.num_labels:
        raise ValueError(
            f"`class_prior` must have one frequency per label (num_labels={config.num_labels}), "
            f"got {len(config.class_prior)}."
        )


def map_every_auto_class(config, model_module: str, base, masked_lm, classifier) -> None:
    """Points every Auto class at the folder's own files: transformers only maps the head being saved, and a folder
    should load as remote code through AutoModel, AutoModelForMaskedLM and AutoModelForSequenceClassification alike."""
    module = model_module.rsplit(".", 1)[-1]
    config.auto_map = {
        **(getattr(config, "auto_map", None) or {}),
        "AutoConfig": f"{type(config).__module__.rsplit('.', 1)[-1]}.{type(config).__name__}",
        "AutoModel": f"{module}.{base.__name__}",
        "AutoModelForMaskedLM": f"{module}.{masked_lm.__name__}",
        "AutoModelForSequenceClassification": f"{module}.{classifier.__name__}",
    }

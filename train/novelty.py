"""Open-set detection: flags cells of a type the classifier was never trained on.

scBERT called a cell "Unassigned" when its top probability was under 0.5, a rule that failed its own
leave-one-type-out tests: a softmax is confident far from the training data. Here four scores are computed from the
classifier's logits and its cell embedding (the vector the head reads); higher means more novel:

- ``max_probability``: 1 - the top softmax probability (scBERT's rule, as a score);
- ``energy``: -logsumexp(logits) (Liu et al. 2020), which keeps the logits' scale that a softmax discards;
- ``prototype_distance``: 1 - the cosine similarity to the nearest class mean of the training embeddings;
- ``mahalanobis``: the smallest Mahalanobis distance to a class mean under the shared (Ledoit-Wolf) covariance of
  the training embeddings (Lee et al. 2018);
- ``expression_knn``: the distance to the 5th nearest training cell in the 50 principal components of the
  log-normalised expression of the genes the model reads. It does not depend on the classifier, whose embedding
  can map an unseen type right onto a similar trained one (a fine-tuned encoder keeps what separates the trained
  types, little else); the folder then keeps the training cells' 50 coordinates;
- ``class_scaled_knn``: ``expression_knn`` divided by the median of the same distance over the training cells of
  the predicted type (each without itself). A rare or diffuse type has far-apart cells, so one threshold for all
  types flags its known cells first, which is what costs macro-F1;
- combinations (``COMBINATIONS``): the mean or the maximum of two or three of the scores above, each first centred
  on its validation median and divided by its validation interquartile range. The parts fail on different types
  (benchmarks/results/novelty/): the embedding maps some unseen types onto a trained one, and types that differ in a
  few genes sit close in expression space. ``combined`` / ``combined_max`` pool class-scaled kNN with Mahalanobis,
  ``knn_energy`` with energy, ``knn_mahalanobis_energy`` all three. Energy grows less than the Mahalanobis distance
  for the known cells of a rare type: the encoder pulls a rare type's few training cells together, and its unseen
  cells land about twice as far from their class mean as the training cells do (Baron, types of 5-10 training
  cells), so a covariance estimated on the training cells calls them novel.

`fit_novelty_detector` takes the class statistics from the training cells and, for every score, the threshold that
flags ``false_flag_rate`` of the validation cells (all of known types); the folder then records them
(`config.novelty_detection` and `novelty.safetensors`), so the command, the Python function and a Space flag alike.
A cell is flagged (`flag_novel`) when the detector's score is above its threshold and, where the expression is
available, its class-scaled kNN distance is above the validation cells' median (the gate): the classifier's signals
(energy, Mahalanobis) also rise for the unseen known cells of a type with a handful of training cells, which the
validation cells cannot calibrate (Baron holds 0 or 1 of them for its rarest types), while the class-scaled kNN is
scaled by that type's own training cells. The gate decides the flag only; a score's ranking (its AUROC) is its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

STATISTICS_FILE = "novelty.safetensors"
LOGIT_SCORES = ("max_probability", "energy")
EMBEDDING_SCORES = ("prototype_distance", "mahalanobis")
EXPRESSION_SCORES = ("expression_knn", "class_scaled_knn")
# name: (parts, how they are pooled)
COMBINATIONS = {"combined": (("class_scaled_knn", "mahalanobis"), "mean"),
                "combined_max": (("class_scaled_knn", "mahalanobis"), "max"),
                "knn_energy": (("class_scaled_knn", "energy"), "mean"),
                "knn_mahalanobis_energy": (("class_scaled_knn", "mahalanobis", "energy"), "mean")}
COMBINED_SCORES = tuple(COMBINATIONS)
NEIGHBOURS = 5
COMPONENTS = 50
# The score cells are flagged by: of the scores benchmarks/results/novelty/ measured (leave one type out), the one
# with the best AUROC; then the best a model and input without its parts can compute (scBERT v1 has no embedding).
SCORE_PREFERENCE = ("knn_mahalanobis_energy", "knn_energy", "energy")
DEFAULT_SCORE = SCORE_PREFERENCE[0]
GATE_SCORE = "class_scaled_knn"
GATE_QUANTILE = 0.5
# A folder fine-tuned before the detector existed falls back to scBERT's rule: top probability below 0.5.
SCBERT_RULE = {"score": "max_probability", "thresholds": {"max_probability": 0.5}, "fitted_on": "scBERT's fixed rule"}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def _max_probability(logits, embeddings, statistics, expression) -> np.ndarray:
    return 1.0 - np.exp(_log_softmax(logits).max(-1))


def _energy(logits, embeddings, statistics, expression) -> np.ndarray:
    top = logits.max(-1)
    return -(top + np.log(np.exp(logits - top[:, None]).sum(-1)))


def _prototype_distance(logits, embeddings, statistics, expression) -> np.ndarray:
    return 1.0 - (_unit(embeddings) @ statistics["prototypes"].T).max(-1)


def _mahalanobis(logits, embeddings, statistics, expression) -> np.ndarray:
    # One class at a time: [cells, width] offsets, never a [cells, classes, width] block.
    squared = np.full(len(embeddings), np.inf)
    for mean in statistics["class_means"]:
        offsets = embeddings - mean
        squared = np.minimum(squared, np.sum((offsets @ statistics["precision"]) * offsets, axis=-1))
    return np.sqrt(np.maximum(squared, 0.0))


def _expression_knn(logits, embeddings, statistics, expression) -> np.ndarray:
    return expression_knn_distance(expression, statistics)


def _class_scaled_knn(logits, embeddings, statistics, expression) -> np.ndarray:
    return _expression_knn(logits, embeddings, statistics, expression) / statistics["class_knn_scale"][logits.argmax(-1)]


SCORE_FUNCTIONS = {"max_probability": _max_probability, "energy": _energy,
                   "prototype_distance": _prototype_distance, "mahalanobis": _mahalanobis,
                   "expression_knn": _expression_knn, "class_scaled_knn": _class_scaled_knn}


def _combine(name: str, scores: dict[str, np.ndarray], statistics: dict[str, np.ndarray]) -> np.ndarray:
    """Combination ``name`` of its parts' ``scores``, each centred and scaled by its validation statistics."""
    parts, pooling = COMBINATIONS[name]
    standardised = np.stack([(scores[part] - statistics[f"location_{part}"]) / statistics[f"scale_{part}"]
                             for part in parts], -1)  # [cells, parts]
    return standardised.mean(-1) if pooling == "mean" else standardised.max(-1)


def novelty_scores(logits: np.ndarray, embeddings: np.ndarray | None, statistics: dict[str, np.ndarray] | None,
                   expression=None, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The scores ``names`` (default: every score this model and input support) that can be computed, one value
    per cell (higher: more novel). ``expression``: the cells' log2-normalised values over the vocabulary (cells x
    vocabulary genes, sparse), for ``expression_knn``."""
    statistics = statistics or {}
    available = list(LOGIT_SCORES)
    if embeddings is not None and "class_means" in statistics:
        available += EMBEDDING_SCORES
    if expression is not None and "train_coordinates" in statistics:
        available += EXPRESSION_SCORES
    available += [name for name, (parts, _) in COMBINATIONS.items()
                  if all(part in available and f"location_{part}" in statistics for part in parts)]
    wanted = [name for name in available if names is None or name in names]
    # Each part once, however many of the wanted combinations share it (the kNN search is the costly one).
    parts = {part for name in wanted if name in COMBINATIONS for part in COMBINATIONS[name][0]}
    logits = logits.astype(np.float64)
    embeddings = None if embeddings is None else embeddings.astype(np.float64)
    base = {name: SCORE_FUNCTIONS[name](logits, embeddings, statistics, expression)
            for name in parts | (set(wanted) - set(COMBINATIONS))}
    return {name: _combine(name, base, statistics) if name in COMBINATIONS else base[name] for name in wanted}


def model_expression_genes(tokenizer) -> np.ndarray | None:
    """The vocabulary columns the model reads (its highly variable genes); None: all of them."""
    return None if tokenizer.selected_genes is None else tokenizer.selected_token_ids - tokenizer.num_special_tokens


def expression_coordinates(expression, statistics: dict[str, np.ndarray]) -> np.ndarray:
    """[cells, vocabulary genes] -> [cells, components]: the training cells' principal components."""
    X = expression[:, statistics["expression_genes"].astype(np.int64)]
    return np.asarray(X @ statistics["pca_components"].T) - statistics["pca_mean"] @ statistics["pca_components"].T


def expression_knn_distance(expression, statistics: dict[str, np.ndarray]) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    train = statistics["train_coordinates"]
    neighbours = NearestNeighbors(n_neighbors=min(NEIGHBOURS, len(train)), algorithm="brute").fit(train)
    return neighbours.kneighbors(expression_coordinates(expression, statistics))[0][:, -1]


def expression_statistics(expression, genes: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """PCA of the training cells' log-normalised expression over ``genes`` (vocabulary columns), their coordinates
    and, per class, the median distance of its training cells to their 5th nearest other training cell."""
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    _check_every_class_has_cells(labels, num_classes)
    X = expression[:, genes]
    components = min(COMPONENTS, X.shape[0] - 1, X.shape[1] - 1)
    pca = PCA(n_components=components, svd_solver="arpack", random_state=0).fit(X)
    coordinates = pca.transform(X)
    # kneighbors() without a query leaves each cell out of its own neighbours.
    neighbours = NearestNeighbors(n_neighbors=min(NEIGHBOURS, len(coordinates) - 1), algorithm="brute").fit(coordinates)
    own_distance = neighbours.kneighbors()[0][:, -1]
    scale = np.array([np.median(own_distance[labels == c]) for c in range(num_classes)])
    return {"expression_genes": genes.astype(np.int64), "pca_components": pca.components_, "pca_mean": pca.mean_,
            "train_coordinates": coordinates, "class_knn_scale": np.maximum(scale, 1e-12)}


def _check_every_class_has_cells(labels: np.ndarray, num_classes: int) -> None:
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"Classes {missing} have no training cells: their statistics cannot be estimated.")


def class_statistics(embeddings: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Class means (raw and of unit vectors) and the shrunk shared precision matrix of the training embeddings."""
    from sklearn.covariance import LedoitWolf

    embeddings = embeddings.astype(np.float64)
    _check_every_class_has_cells(labels, num_classes)
    class_means = np.stack([embeddings[labels == c].mean(0) for c in range(num_classes)])
    prototypes = _unit(np.stack([_unit(embeddings[labels == c]).mean(0) for c in range(num_classes)]))
    covariance = LedoitWolf().fit(embeddings - class_means[labels]).covariance_
    return {"class_means": class_means, "prototypes": prototypes, "precision": np.linalg.pinv(covariance)}


def fit_novelty_detector(train: dict, validation: dict, num_classes: int, false_flag_rate: float,
                         expression_genes: np.ndarray | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """The ``config.novelty_detection`` entry and the statistics, from ``{"logits", "embeddings", "labels",
    "expression"}`` of the training and the validation cells (embeddings and expression may be None);
    ``expression_genes``: the vocabulary columns the model reads (None: all)."""
    if not 0 < false_flag_rate < 1:
        raise ValueError(f"--novelty_false_flag_rate must be in (0, 1), got {false_flag_rate}.")
    statistics = {}
    if train.get("embeddings") is not None:
        statistics.update(class_statistics(train["embeddings"], train["labels"], num_classes))
    if train.get("expression") is not None:
        genes = np.arange(train["expression"].shape[1]) if expression_genes is None else np.asarray(expression_genes)
        statistics.update(expression_statistics(train["expression"], genes, train["labels"], num_classes))
    scores = novelty_scores(validation["logits"], validation.get("embeddings"), statistics,
                            validation.get("expression"))
    for part in {part for parts, _ in COMBINATIONS.values() for part in parts} & set(scores):
        quartiles = np.quantile(scores[part], [0.25, 0.5, 0.75])
        statistics.update({f"location_{part}": quartiles[1:2],
                           f"scale_{part}": np.maximum(quartiles[2:] - quartiles[:1], 1e-12)})
    scores.update({name: _combine(name, scores, statistics) for name, (parts, _) in COMBINATIONS.items()
                   if set(parts) <= set(scores)})
    thresholds = {name: float(np.quantile(values, 1.0 - false_flag_rate)) for name, values in scores.items()}
    settings = {"score": next(name for name in SCORE_PREFERENCE if name in thresholds), "thresholds": thresholds,
                "false_flag_rate": false_flag_rate,
                "fitted_on": f"statistics: {len(train['labels'])} training cells; thresholds: "
                             f"{len(validation['logits'])} validation cells"}
    if GATE_SCORE in scores:
        settings["gate"] = {"score": GATE_SCORE, "threshold": float(np.quantile(scores[GATE_SCORE], GATE_QUANTILE))}
    return settings, statistics


def detector_score_names(settings: dict) -> list[str]:
    """The scores `flag_novel` reads: the detector's own and its gate's."""
    gate = settings.get("gate")
    return [settings["score"]] + ([gate["score"]] if gate else [])


def flag_novel(scores: dict[str, np.ndarray], settings: dict) -> np.ndarray:
    """The detector's decision per cell: its score above its threshold, and its gate's score above the gate's."""
    score = settings["score"]
    flagged = scores[score] > settings["thresholds"][score]
    gate = settings.get("gate")
    return flagged & (scores[gate["score"]] > gate["threshold"]) if gate else flagged


def save_statistics(statistics: dict[str, np.ndarray], folder: str | os.PathLike) -> None:
    from safetensors.numpy import save_file

    save_file({name: value if value.dtype.kind == "i" else value.astype(np.float32) for name, value in statistics.items()},
              str(Path(folder) / STATISTICS_FILE))


def load_detector(config, folder: str | os.PathLike | None) -> tuple[dict, dict[str, np.ndarray] | None]:
    """The folder's detector settings and statistics; scBERT's rule for a folder fine-tuned before they existed."""
    from safetensors.numpy import load_file

    settings = getattr(config, "novelty_detection", None)
    if settings is None:
        return SCBERT_RULE, None
    path = Path(folder) / STATISTICS_FILE if folder else None
    needs_statistics = settings["score"] in EMBEDDING_SCORES + EXPRESSION_SCORES + COMBINED_SCORES
    if needs_statistics and (path is None or not path.is_file()):
        raise FileNotFoundError(
            f"The model's novelty detector flags by {settings['score']!r}, which needs the class statistics in "
            f"{STATISTICS_FILE} next to config.json; none was found in {folder!r}. Copy the whole fine-tuned folder."
        )
    statistics = load_file(str(path)) if path is not None and path.is_file() else None
    return settings, ({k: v if v.dtype.kind == "i" else v.astype(np.float64) for k, v in statistics.items()}
                      if statistics else None)

"""The open-set detector (train/novelty.py) on hand-made logits and embeddings with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from types import SimpleNamespace

from train.novelty import (COMBINED_SCORES, DEFAULT_SCORE, GATE_SCORE, SCBERT_RULE, STATISTICS_FILE,
                           detector_score_names, fit_novelty_detector, flag_novel, load_detector, novelty_scores,
                           save_statistics)


def clusters(rng, centres: np.ndarray, per_class: int, spread: float = 0.3):
    labels = np.repeat(np.arange(len(centres)), per_class)
    embeddings = centres[labels] + spread * rng.standard_normal((len(labels), centres.shape[1]))
    logits = embeddings @ centres.T  # a classifier that scores by alignment with each class centre
    return {"logits": logits, "embeddings": embeddings, "labels": labels}


@pytest.fixture
def known_and_novel():
    rng = np.random.default_rng(0)
    centres = 3.0 * np.eye(4, 8)  # 4 known classes in 8 dimensions
    novel_centre = 3.0 * np.eye(8)[6:7]  # a fifth direction the classifier never saw
    return (clusters(rng, centres, 200), clusters(rng, centres, 100), clusters(rng, centres, 100),
            clusters(rng, novel_centre, 100)["embeddings"], centres)


def auroc(novel_scores, known_scores) -> float:
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(np.r_[np.ones(len(novel_scores)), np.zeros(len(known_scores))], np.r_[novel_scores, known_scores])


def test_thresholds_flag_the_requested_share_of_validation_cells(known_and_novel):
    train, validation, _, _, _ = known_and_novel
    settings, statistics = fit_novelty_detector(train, validation, 4, false_flag_rate=0.05)
    scores = novelty_scores(validation["logits"], validation["embeddings"], statistics)
    assert set(settings["thresholds"]) == set(scores) == {"max_probability", "energy", "prototype_distance",
                                                          "mahalanobis"}  # no expression given: no expression_knn
    for name, values in scores.items():
        assert np.mean(values > settings["thresholds"][name]) == pytest.approx(0.05, abs=0.011), name
    assert settings["score"] == "energy" and "gate" not in settings  # no expression: no kNN part, no gate
    assert statistics["precision"].shape == (8, 8)


def test_embedding_scores_separate_a_new_type_that_the_softmax_misses(known_and_novel):
    train, _, test, novel_embeddings, centres = known_and_novel
    _, statistics = fit_novelty_detector(train, test, 4, false_flag_rate=0.05)
    known = novelty_scores(test["logits"], test["embeddings"], statistics)
    novel = novelty_scores(novel_embeddings @ centres.T, novel_embeddings, statistics)
    assert auroc(novel["mahalanobis"], known["mahalanobis"]) > 0.99
    assert auroc(novel["prototype_distance"], known["prototype_distance"]) > 0.99
    # The novel cells' logits are all near zero: a flat softmax (max_probability sees that) and a low energy.
    assert auroc(novel["energy"], known["energy"]) > 0.9


def test_scores_match_their_definitions():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    scores = novelty_scores(logits, None, None)
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(scores["max_probability"], 1 - probabilities.max(-1))
    np.testing.assert_allclose(scores["energy"], -np.log(np.exp(logits).sum(-1)))
    assert set(scores) == {"max_probability", "energy"}  # no embeddings: only the logit scores


def test_bad_settings_and_missing_statistics_fail_clearly(known_and_novel, tmp_path):
    train, validation, _, _, _ = known_and_novel
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        fit_novelty_detector(train, validation, 4, false_flag_rate=0.0)
    with pytest.raises(ValueError, match=r"Classes \[4\] have no training cells"):
        fit_novelty_detector(train, validation, 5, false_flag_rate=0.05)
    settings, statistics = fit_novelty_detector(train, validation, 4, false_flag_rate=0.05)
    settings["score"] = "mahalanobis"  # a score that needs the statistics file
    config = SimpleNamespace(novelty_detection=settings)
    with pytest.raises(FileNotFoundError, match=STATISTICS_FILE):
        load_detector(config, tmp_path)
    save_statistics(statistics, tmp_path)
    loaded_settings, loaded = load_detector(config, tmp_path)
    assert loaded_settings == settings and set(loaded) == set(statistics)
    np.testing.assert_allclose(loaded["class_means"], statistics["class_means"], rtol=1e-6)
    # A folder fine-tuned before the detector existed: scBERT's rule, top probability below 0.5.
    assert load_detector(SimpleNamespace(novelty_detection=None), tmp_path) == (SCBERT_RULE, None)


def test_expression_knn_flags_cells_far_from_every_training_cell_in_expression_space(tmp_path):
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    programmes = rng.gamma(1.0, 1.0, size=(4, 300)) * (rng.random((4, 300)) < 0.2)  # 4 known types, 1 novel

    def expression(type_index: int, n: int):
        return sp.csr_matrix(np.log2(1 + rng.poisson(3 * programmes[type_index], size=(n, 300))))

    labels = np.repeat(np.arange(3), 60)
    train = {"logits": rng.normal(size=(180, 3)), "embeddings": None, "labels": labels,
             "expression": sp.vstack([expression(t, 60) for t in range(3)]).tocsr()}
    validation = {"logits": rng.normal(size=(90, 3)), "expression": sp.vstack([expression(t, 30) for t in range(3)]).tocsr()}
    genes = np.arange(0, 300, 2)  # the model reads every other gene
    settings, statistics = fit_novelty_detector(train, validation, 3, 0.05, expression_genes=genes)
    assert settings["score"] == "knn_energy"  # no embedding: the best score without Mahalanobis
    assert "mahalanobis" not in settings["thresholds"] and statistics["train_coordinates"].shape == (180, 50)
    known = novelty_scores(rng.normal(size=(90, 3)), None, statistics,
                           sp.vstack([expression(t, 30) for t in range(3)]).tocsr())["expression_knn"]
    novel = novelty_scores(rng.normal(size=(60, 3)), None, statistics, expression(3, 60))["expression_knn"]
    assert auroc(novel, known) > 0.95
    threshold = settings["thresholds"]["expression_knn"]
    assert np.mean(novel > threshold) > 0.8 and np.mean(known > threshold) < 0.15
    save_statistics(statistics, tmp_path)  # gene indices stay integers through the file
    _, loaded = load_detector(SimpleNamespace(novelty_detection=settings), tmp_path)
    assert loaded["expression_genes"].dtype.kind == "i" and np.array_equal(loaded["expression_genes"], genes)


def gaussian_cells(rng, centres: np.ndarray, labels: np.ndarray, spreads: np.ndarray):
    """Dense 'expression' (any values work for the PCA) as the sparse matrix the scores take."""
    import scipy.sparse as sp

    return sp.csr_matrix(centres[labels] + spreads[labels, None] * rng.standard_normal((len(labels), centres.shape[1])))


def test_class_scale_is_the_median_distance_of_a_types_training_cells_to_their_5th_nearest_other_cell():
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], [40, 12])
    expression = gaussian_cells(rng, 4.0 * np.eye(2, 30), labels, np.array([0.5, 2.0]))
    train = {"logits": np.eye(2)[labels], "embeddings": None, "labels": labels, "expression": expression}
    _, statistics = fit_novelty_detector(train, train, 2, 0.05)
    distances = cdist(statistics["train_coordinates"], statistics["train_coordinates"])
    np.fill_diagonal(distances, np.inf)
    fifth = np.sort(distances, axis=1)[:, 4]
    np.testing.assert_allclose(statistics["class_knn_scale"], [np.median(fifth[labels == c]) for c in (0, 1)], rtol=1e-6)


def test_class_scaling_stops_one_threshold_from_flagging_the_known_cells_of_a_diffuse_rare_type():
    rng = np.random.default_rng(2)
    centres, spreads = 6.0 * np.eye(3, 40), np.array([0.5, 0.5, 2.0])  # type 2: rare and spread out

    def cells(per_type):
        labels = np.repeat(np.arange(3), per_type)
        return {"logits": 5.0 * np.eye(3)[labels], "embeddings": None, "labels": labels,
                "expression": gaussian_cells(rng, centres, labels, spreads)}

    train, validation, test = cells([300, 300, 20]), cells([100, 100, 4]), cells([100, 100, 30])
    settings, statistics = fit_novelty_detector(train, validation, 3, 0.05)
    scores = novelty_scores(test["logits"], None, statistics, test["expression"])
    rare = test["labels"] == 2
    flagged = {name: np.mean(scores[name][rare] > settings["thresholds"][name])
               for name in ("expression_knn", "class_scaled_knn")}
    assert flagged["expression_knn"] > 0.8 and flagged["class_scaled_knn"] < 0.2, flagged


def test_combined_scores_catch_novel_cells_that_only_one_of_their_parts_sees():
    rng = np.random.default_rng(3)
    centres = 4.0 * np.eye(5, 30)  # types 0-2 known; 3 and 4 only as novel cells
    ones = np.ones(5)

    def cells(labels, embedding_type):
        """Embeddings of the classifier: type ``embedding_type[label]`` (a novel type mapped onto a known one)."""
        embeddings = centres[embedding_type[labels], :8] + 0.3 * rng.standard_normal((len(labels), 8))
        return {"logits": embeddings @ centres[:3, :8].T, "embeddings": embeddings, "labels": labels,
                "expression": gaussian_cells(rng, centres, labels, 0.5 * ones)}

    honest = np.arange(5)  # the embedding tells every type apart
    train, validation, known = (cells(np.repeat(np.arange(3), n), honest) for n in (150, 60, 60))
    settings, statistics = fit_novelty_detector(train, validation, 3, 0.05)
    # Novel in expression only: the classifier maps type 3 onto type 0's embedding.
    expression_only = cells(np.full(60, 3), np.array([0, 1, 2, 0, 4]))
    # Novel in the embedding only: type 4's expression is type 1's, but its embedding is new.
    embedding_only = cells(np.full(60, 1), honest) | {"embeddings": centres[4, :8] + 0.3 * rng.standard_normal((60, 8))}
    embedding_only["logits"] = embedding_only["embeddings"] @ centres[:3, :8].T

    def auroc_of(novel, name):
        score = lambda c: novelty_scores(c["logits"], c["embeddings"], statistics, c["expression"])[name]
        return auroc(score(novel), score(known))

    assert auroc_of(expression_only, "mahalanobis") < 0.7 and auroc_of(embedding_only, "class_scaled_knn") < 0.7
    for name in COMBINED_SCORES:
        assert auroc_of(expression_only, name) > 0.95 and auroc_of(embedding_only, name) > 0.95, name
        validation_scores = novelty_scores(validation["logits"], validation["embeddings"], statistics,
                                           validation["expression"])[name]
        assert np.mean(validation_scores > settings["thresholds"][name]) == pytest.approx(0.05, abs=0.011)


def rare_type_cells(rng, counts, rare_spread, novel: int = 0):
    """Types 0-1 common, 2 rare (the encoder packs its training cells within ``rare_spread``), then ``novel`` cells
    of a type 3 that is new in expression and in the embedding."""
    centres = 4.0 * np.eye(4, 30)
    labels = np.repeat(np.arange(4), [*counts, novel])
    spread = np.where(labels == 2, rare_spread, 0.3)[:, None]
    embeddings = centres[labels, :8] + spread * rng.standard_normal((len(labels), 8))
    return {"logits": embeddings @ centres[:3, :8].T, "embeddings": embeddings, "labels": labels,
            "expression": gaussian_cells(rng, centres, labels, 0.5 * np.ones(4))}


def test_knn_energy_spares_the_known_cells_of_a_rare_type_the_encoder_pulled_together():
    """The encoder packs a rare type's few training cells tight; its unseen cells spread as wide as a common type's
    do, further than the training cells' covariance expects (benchmarks/results/novelty/, Baron)."""
    rng = np.random.default_rng(0)
    # No validation cell of the rare type, as in Baron's rarest types.
    train, validation = rare_type_cells(rng, [300, 300, 6], 0.05), rare_type_cells(rng, [100, 100, 0], 0.3)
    test = rare_type_cells(rng, [100, 100, 30], 0.6)
    settings, statistics = fit_novelty_detector(train, validation, 3, 0.05)
    scores = novelty_scores(test["logits"], test["embeddings"], statistics, test["expression"])
    rare = test["labels"] == 2
    flagged = {name: np.mean(scores[name][rare] > settings["thresholds"][name])
               for name in ("mahalanobis", "combined", "knn_energy")}
    assert flagged["mahalanobis"] > 0.8 and flagged["combined"] > 0.5 and flagged["knn_energy"] < 0.25, flagged


def test_the_gate_is_the_validation_median_of_the_class_scaled_knn_and_only_takes_flags_away():
    rng = np.random.default_rng(4)
    train, validation = rare_type_cells(rng, [300, 300, 6], 0.05), rare_type_cells(rng, [100, 100, 0], 0.3)
    test = rare_type_cells(rng, [100, 100, 30], 0.6, novel=40)
    settings, statistics = fit_novelty_detector(train, validation, 3, 0.05)
    validation_scores = novelty_scores(validation["logits"], validation["embeddings"], statistics,
                                       validation["expression"])
    assert settings["score"] == DEFAULT_SCORE and detector_score_names(settings) == [DEFAULT_SCORE, GATE_SCORE]
    assert settings["gate"] == {"score": GATE_SCORE, "threshold": pytest.approx(np.median(validation_scores[GATE_SCORE]))}
    scores = novelty_scores(test["logits"], test["embeddings"], statistics, test["expression"],
                            names=detector_score_names(settings))
    assert set(scores) == {DEFAULT_SCORE, GATE_SCORE}
    ungated = scores[DEFAULT_SCORE] > settings["thresholds"][DEFAULT_SCORE]
    np.testing.assert_array_equal(flag_novel(scores, settings),
                                  ungated & (scores[GATE_SCORE] > settings["gate"]["threshold"]))
    np.testing.assert_array_equal(flag_novel(scores, {k: v for k, v in settings.items() if k != "gate"}), ungated)


def test_the_gate_spares_a_rare_types_known_cells_and_still_flags_a_novel_type():
    """The default score's Mahalanobis and energy parts call a rare type's unseen cells novel (its training cells
    were packed tight; none is among the validation cells, as in Baron); its class-scaled kNN does not."""
    rng = np.random.default_rng(5)
    train, validation = rare_type_cells(rng, [300, 300, 6], 0.05), rare_type_cells(rng, [100, 100, 0], 0.3)
    test = rare_type_cells(rng, [100, 100, 30], 0.6, novel=40)
    settings, statistics = fit_novelty_detector(train, validation, 3, 0.05)
    scores = novelty_scores(test["logits"], test["embeddings"], statistics, test["expression"])
    rare, novel = test["labels"] == 2, test["labels"] == 3
    ungated = scores[DEFAULT_SCORE] > settings["thresholds"][DEFAULT_SCORE]
    flagged = flag_novel(scores, settings)
    assert ungated[rare].mean() > 0.4 and flagged[rare].mean() < 0.15, (ungated[rare].mean(), flagged[rare].mean())
    assert flagged[novel].mean() > 0.9


def test_a_malformed_gate_in_the_config_is_refused():
    from huggingface_hub.errors import StrictDataclassError

    from modeling_scbert import ScBert2Config

    good = {"score": "knn_energy", "thresholds": {"knn_energy": 1.0, "class_scaled_knn": 1.2},
            "gate": {"score": "class_scaled_knn", "threshold": 1.1}}
    assert ScBert2Config(novelty_detection=good).novelty_detection == good
    for gate in ({"score": "not_a_score", "threshold": 1.0}, {"score": "class_scaled_knn", "threshold": float("nan")},
                 "class_scaled_knn > 1"):
        with pytest.raises(StrictDataclassError, match="optionally `gate`"):
            ScBert2Config(novelty_detection=good | {"gate": gate})

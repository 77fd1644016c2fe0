"""The learned gate: a logistic model that decides, per query, how much of the memory's
correction to apply: resmem(x) = p(x) + g(x) * sum_i w_i r_i, g(x) = P(base is wrong | x).

It reads what a query's lookup already gives (base confidence, how far the neighbours
are, whether they agree with the model) and is fitted on the validation split. Its
parameters are plain JSON (tune/best.json), applied with numpy at evaluation.
"""

from __future__ import annotations

import numpy as np

from resmem_ray.errors import ResMemError

FEATURES = ("base_confidence", "base_margin", "neighbour_agreement", "nn1_agrees", "nn1_distance",
            "mean_distance", "corrected_confidence", "correction_flips")


def gate_features(probs: np.ndarray, neighbour_labels: np.ndarray, distances: np.ndarray,
                  correction: np.ndarray) -> np.ndarray:
    """(n, len(FEATURES)) from base probs (n, C), the k neighbours' labels and distances
    (n, k) and the memory's correction (n, C)."""
    top2 = np.sort(probs, axis=1)[:, -2:]
    base = probs.argmax(1)
    corrected = probs + correction
    return np.stack([
        top2[:, 1],
        top2[:, 1] - top2[:, 0],
        (neighbour_labels == base[:, None]).mean(1),
        (neighbour_labels[:, 0] == base).astype(np.float64),
        distances[:, 0],
        distances.mean(1),
        corrected.max(1),
        (corrected.argmax(1) != base).astype(np.float64),
    ], axis=1).astype(np.float64)


def fit_learned_gate(features: np.ndarray, base_wrong: np.ndarray) -> dict:
    """Logistic regression of 'the base model is wrong' on the features (balanced classes)."""
    from sklearn.linear_model import LogisticRegression

    errors = int(base_wrong.sum())
    if errors < 2 or errors > len(base_wrong) - 2:
        raise ResMemError(f"config key tune.learned_gate: the base model is wrong on {errors} of "
                          f"{len(base_wrong)} val examples; the gate needs at least 2 of each outcome "
                          "(use a larger val split or set tune.learned_gate=false)")
    mean, scale = features.mean(0), features.std(0) + 1e-9
    model = LogisticRegression(class_weight="balanced", C=1.0, max_iter=1000)
    model.fit((features - mean) / scale, base_wrong.astype(int))
    return {"features": list(FEATURES), "mean": mean.tolist(), "scale": scale.tolist(),
            "coef": model.coef_[0].tolist(), "intercept": float(model.intercept_[0]),
            "fit_examples": int(len(base_wrong)), "fit_base_errors": errors}


def learned_gate(params: dict, features: np.ndarray) -> np.ndarray:
    """g(x) in (0, 1) for each row of features."""
    if params["features"] != list(FEATURES):
        raise ResMemError(f"the learned gate was fitted on features {params['features']}, this version "
                          f"computes {list(FEATURES)}: rerun `resmem tune`")
    z = (features - np.array(params["mean"])) / np.array(params["scale"])
    return 1.0 / (1.0 + np.exp(-(z @ np.array(params["coef"]) + params["intercept"])))

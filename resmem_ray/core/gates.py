"""Learned gates, logistic models fitted on the validation split whose parameters are
plain JSON (tune/best.json), applied with numpy at evaluation:

- the learned gate decides, per query, how much of the memory's correction to apply:
  resmem(x) = p(x) + g(x) * sum_i w_i r_i, g(x) = P(base is wrong | x), from what a
  query's lookup already gives (base confidence, how far the neighbours are, whether they
  agree with the model);
- the retrieval gate (a token LM's, as in efficient kNN-LM) decides before any search
  whether the memory will help a token, from what the model alone gives (max p, entropy,
  the hidden state's norm): only the tokens it opens need a search.
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


def fit_logistic(features: np.ndarray, target: np.ndarray, names: tuple[str, ...], what: str) -> dict:
    """Logistic regression of a yes/no target on standardised features (balanced classes)."""
    from sklearn.linear_model import LogisticRegression

    yes = int(target.sum())
    if yes < 2 or yes > len(target) - 2:
        raise ResMemError(f"config key tune.learned_gate: {what} on {yes} of {len(target)} val examples; the gate "
                          "needs at least 2 of each outcome (use a larger val split or set tune.learned_gate=false)")
    mean, scale = features.mean(0), features.std(0) + 1e-9
    model = LogisticRegression(class_weight="balanced", C=1.0, max_iter=1000)
    model.fit((features - mean) / scale, target.astype(int))
    return {"features": list(names), "mean": mean.tolist(), "scale": scale.tolist(),
            "coef": model.coef_[0].tolist(), "intercept": float(model.intercept_[0]), "fit_examples": int(len(target))}


def logistic(params: dict, features: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """P(yes) in (0, 1) for each row of features."""
    if params["features"] != list(names):
        raise ResMemError(f"the gate was fitted on features {params['features']}, this version "
                          f"computes {list(names)}: rerun `resmem tune`")
    z = (features - np.array(params["mean"])) / np.array(params["scale"])
    return 1.0 / (1.0 + np.exp(-(z @ np.array(params["coef"]) + params["intercept"])))


def fit_learned_gate(features: np.ndarray, base_wrong: np.ndarray) -> dict:
    """The learned gate: P(base model wrong) from gate_features."""
    params = fit_logistic(features, base_wrong, FEATURES, "the base model is wrong")
    return {**params, "fit_base_errors": int(base_wrong.sum())}


def learned_gate(params: dict, features: np.ndarray) -> np.ndarray:
    """g(x) in (0, 1) for each row of features."""
    return logistic(params, features, FEATURES)


RETRIEVAL_FEATURES = ("max_p", "entropy", "embedding_norm")


def retrieval_features(p: np.ndarray, embedding_norm: np.ndarray) -> np.ndarray:
    """(n, 3) from a token's next-token probabilities p (n, V) and its embedding's L2 norm."""
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    return np.stack([p.max(1), entropy, embedding_norm], axis=1).astype(np.float64)


def fit_retrieval_gate(features: np.ndarray, helps: np.ndarray) -> dict:
    """The retrieval gate: P(the memory raises the true token's probability) from
    retrieval_features."""
    params = fit_logistic(features, helps, RETRIEVAL_FEATURES, "the memory helps")
    return {**params, "fit_helped": int(helps.sum())}


def retrieval_gate(params: dict, features: np.ndarray) -> np.ndarray:
    """Each token's score; the gate opens the tokens whose score reaches a cut-off."""
    return logistic(params, features, RETRIEVAL_FEATURES)

"""The ResMem math, in one place (Yang et al., NeurIPS 2023).

    p(x)      = softmax(logits(x) / T)                 base prediction
    r_i       = onehot(y_i) - p(x_i)                   residual of training example i
    w_i(x)    = softmax_i(-d(z(x), z_i) / sigma)       over the k nearest neighbours
    resmem(x) = p(x) + gate * sum_i w_i(x) r_i

The baseline users compare it with, from the same neighbours (knn_interpolation):

    p_kNN(x)[c] = sum_{i: y_i = c} softmax_i(-d(z(x), z_i) / tau)
    interp(x)   = (1 - lambda) * p(x) + lambda * p_kNN(x)      (kNN-LM for next tokens)

Arrays in, arrays out: no Ray, no FAISS, no torch.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0, axis: int = -1) -> np.ndarray:
    """float64, computed in one new array (vocabulary-wide rows: each temporary costs a pass)."""
    z = np.array(logits, dtype=np.float64)
    if temperature != 1.0:
        z /= temperature
    z -= z.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


def residuals(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """onehot(y) - softmax(logits / T), one row per example, float32."""
    p = softmax(logits, temperature)
    p[np.arange(len(labels)), labels] -= 1.0
    return (-p).astype(np.float32)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def kernel_weights(distances: np.ndarray, sigma: float) -> np.ndarray:
    """softmax(-d / sigma) across each query's neighbours (axis 1)."""
    return softmax(-np.asarray(distances, dtype=np.float64), temperature=sigma, axis=1)


def memory_correction(neighbour_residuals: np.ndarray, distances: np.ndarray, sigma: float) -> np.ndarray:
    """sum_i w_i r_i: neighbour_residuals (n, k, C), distances (n, k) -> (n, C)."""
    w = kernel_weights(distances, sigma)
    return np.einsum("nk,nkc->nc", w, neighbour_residuals.astype(np.float64))


def apply_correction(probs: np.ndarray, correction: np.ndarray, gate: float | np.ndarray = 1.0) -> np.ndarray:
    """p(x) + gate * correction; gate a scalar or one value per row."""
    gate = np.asarray(gate, dtype=np.float64).reshape(-1, 1) if np.ndim(gate) else gate
    return probs + gate * correction


def resmem_probs(probs: np.ndarray, neighbour_residuals: np.ndarray, distances: np.ndarray,
                 sigma: float, gate: float | np.ndarray = 1.0) -> np.ndarray:
    """p(x) + gate * sum_i w_i r_i.

    probs (n, C); neighbour_residuals (n, k, C); distances (n, k); gate a scalar or (n,).
    """
    return apply_correction(probs, memory_correction(neighbour_residuals, distances, sigma), gate)


def confidence_gate(probs: np.ndarray, gate: float, threshold: float, softness: float = 0.0) -> np.ndarray:
    """Per-example gate from the base model's top probability max p(x).

    softness 0: `gate` where max p < threshold, 0 where the model is confident (a threshold
    >= 1 corrects everywhere); softness > 0: gate * sigmoid((threshold - max p) / softness).
    """
    top = probs.max(axis=1)
    if softness > 0:
        return gate * 0.5 * (1.0 + np.tanh((threshold - top) / (2.0 * softness)))  # a sigmoid, no overflow
    if threshold >= 1.0:
        return np.full(len(probs), gate)
    return np.where(top < threshold, gate, 0.0)


def knn_vote(neighbour_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Majority vote over each row of neighbour labels; ties go to the class met earlier.

    Each vote counts 1 plus a rank bonus below 1/k, so counts dominate and among equal
    counts the class whose neighbours rank nearer wins.
    """
    n, k = neighbour_labels.shape
    bonus = (k - np.arange(k)) / (k * (k + 1.0))
    votes = np.zeros((n, num_classes))
    np.add.at(votes, (np.repeat(np.arange(n), k), neighbour_labels.ravel()), np.tile(1.0 + bonus, n))
    return votes.argmax(axis=1)


def knn_probs(neighbour_labels: np.ndarray, distances: np.ndarray, tau: float, num_classes: int) -> np.ndarray:
    """p_kNN[c] = sum_{i: y_i = c} softmax_i(-d_i / tau): neighbour_labels, distances (n, k) -> (n, C).

    Only the queries' (n, C) rows are dense: a vocabulary-sized C (kNN-LM) never builds a
    [memory x vocabulary] matrix.
    """
    n, k = neighbour_labels.shape
    out = np.zeros((n, num_classes))
    np.add.at(out, (np.repeat(np.arange(n), k), neighbour_labels.ravel()), kernel_weights(distances, tau).ravel())
    return out


def knn_interpolation(probs: np.ndarray, neighbour_labels: np.ndarray, distances: np.ndarray,
                      lam: float, tau: float) -> np.ndarray:
    """(1 - lambda) * p + lambda * p_kNN (kNN interpolation; kNN-LM, Khandelwal et al. 2020).

    probs (n, C) the base model's distribution; neighbour_labels, distances (n, k). Rows stay
    distributions: both terms sum to 1.
    """
    return (1.0 - lam) * np.asarray(probs, dtype=np.float64) + \
        lam * knn_probs(neighbour_labels, distances, tau, probs.shape[1])

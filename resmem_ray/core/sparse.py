"""Sparse residual codec for vocabulary-sized outputs (token-level language models).

A dense residual row onehot(y) - p(x) has one float per vocabulary entry: 100M memory
tokens x 32k entries do not fit anywhere. Each memory token keeps instead its label y
and the base model's top-m token ids and probabilities; the residual it stands for is

    r = onehot(y) - sum_j probs_j * onehot(ids_j)       (probabilities beyond the top m read as 0)

which is the dense residual exactly when m covers the vocabulary. A query sums its k
neighbours' sparse rows into its own probability row: only the at most k * (m + 1)
candidate entries named by the neighbours change, and no [memory x vocabulary] matrix
is ever built.

The corrected scores q = p + gate * sum_i w_i r_i can be negative. To stay a
distribution (so that perplexity means something) they are clipped below at
floor * p(v) and renormalised:

    q'(v) = max(q(v), floor * p(v)) / sum_u max(q(u), floor * p(u))

floor = 0 is plain clipping at zero, under which a token can get probability 0 (and
the perplexity turn infinite); a small floor keeps every token the base model allows.

The kNN-LM baseline (Khandelwal et al.) needs only the neighbours' labels and distances:
core/resmem.knn_interpolation, which is dense over the queries' (n, V) rows alone.

Arrays in, arrays out: no Ray, no FAISS; torch only for its multithreaded scatter-add.
"""

from __future__ import annotations

import numpy as np
import torch

from resmem_ray.core.resmem import softmax


def encode(logits: np.ndarray, m: int, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Top-m (ids int32, probabilities float32) of softmax(logits / T), most likely first."""
    p = softmax(logits, temperature)
    m = min(m, p.shape[1])
    top = np.argpartition(-p, m - 1, axis=1)[:, :m] if m < p.shape[1] else np.tile(np.arange(m), (len(p), 1))
    probs = np.take_along_axis(p, top, axis=1)
    order = np.argsort(-probs, axis=1, kind="stable")
    return np.take_along_axis(top, order, 1).astype(np.int32), np.take_along_axis(probs, order, 1).astype(np.float32)


def dense_residuals(labels: np.ndarray, ids: np.ndarray, probs: np.ndarray, vocab_size: int) -> np.ndarray:
    """The (n, V) residual rows that sparse rows stand for (tests and small vocabularies only)."""
    r = np.zeros((len(labels), vocab_size))
    np.add.at(r, (np.arange(len(labels))[:, None], ids), -probs.astype(np.float64))
    r[np.arange(len(labels)), labels] += 1.0
    return r


def sparse_correction(weights: np.ndarray, labels: np.ndarray, ids: np.ndarray, probs: np.ndarray,
                      vocab_size: int) -> np.ndarray:
    """sum_i w_i r_i as (n, V) float64 rows: each neighbour adds w_i at its label and takes
    w_i * prob at each of its top-m ids; nothing else is touched.

    weights (n, k); labels (n, k) neighbour labels; ids, probs (n, k, m) their top-m rows.
    Two scatter-adds into one dense (n, V) array (the cost of a small k, so only one is
    built): torch's runs the rows on every thread, in each row in the order given, so the
    sums are those of a sequential loop.
    """
    n, k = np.shape(weights)
    w = torch.tensor(weights, dtype=torch.float64)
    rows = torch.zeros(n, vocab_size, dtype=torch.float64)
    taken = tensor(probs).to(torch.float64, copy=True).mul_(-w[:, :, None])
    rows.scatter_add_(1, tensor(ids).reshape(n, -1).long(), taken.reshape(n, -1))
    rows.scatter_add_(1, tensor(labels).reshape(n, k).long(), w)
    return rows.numpy()


def tensor(a: np.ndarray) -> torch.Tensor:
    """A torch view of `a`; a copy where `a` is read-only (arrays from Ray's object store)."""
    return torch.from_numpy(np.require(a, requirements=["C", "W"]))


def clip_renormalise(q: np.ndarray, p: np.ndarray, floor: float) -> np.ndarray:
    """max(q, floor * p), rows renormalised to sum to 1, written into q (a scratch array)."""
    np.maximum(q, floor * p if floor else 0.0, out=q)
    q /= q.sum(axis=1, keepdims=True)
    return q


def corrected_probs(p: np.ndarray, weights: np.ndarray, labels: np.ndarray, ids: np.ndarray,
                    probs: np.ndarray, gate: float | np.ndarray = 1.0, floor: float = 0.0) -> np.ndarray:
    """ResMem's distribution for queries with base probabilities p (n, V), from their
    neighbours' sparse rows: p + gate * sum_i w_i r_i, clipped and renormalised. `gate`:
    one number, or one per query (n,)."""
    gate = np.broadcast_to(np.asarray(gate, dtype=np.float64), (len(p),))
    q = sparse_correction(np.asarray(weights, np.float64) * gate[:, None], labels, ids, probs, p.shape[1])
    q += p
    return clip_renormalise(q, p, floor)


def token_metrics(p: np.ndarray, labels: np.ndarray) -> tuple[float, float, int]:
    """(correct, summed negative log-likelihood, count) of next-token predictions."""
    picked = p[np.arange(len(labels)), labels]
    with np.errstate(divide="ignore"):
        nll = -np.log(picked)
    return float((p.argmax(1) == labels).sum()), float(nll.sum()), len(labels)

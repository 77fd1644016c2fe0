"""The ResMem math against a brute-force loop over the paper's formula."""

import math

import numpy as np
import pytest

from resmem_ray.core.resmem import kernel_weights, knn_vote, residuals, resmem_probs, softmax


def brute_force(logits, memory_logits, memory_labels, memory_z, query_z, k, sigma, T, gate):
    out = []
    C = logits.shape[1]
    for q in range(len(logits)):
        p = [math.exp(v / T) for v in logits[q]]
        p = [v / sum(p) for v in p]
        d = [math.sqrt(sum((a - b) ** 2 for a, b in zip(query_z[q], z))) for z in memory_z]
        near = sorted(range(len(d)), key=lambda i: d[i])[:k]
        e = [math.exp(-d[i] / sigma) for i in near]
        w = [v / sum(e) for v in e]
        corr = [0.0] * C
        for wi, i in zip(w, near):
            m = [math.exp(v / T) for v in memory_logits[i]]
            m = [v / sum(m) for v in m]
            for c in range(C):
                corr[c] += wi * ((1.0 if c == memory_labels[i] else 0.0) - m[c])
        out.append([p[c] + gate * corr[c] for c in range(C)])
    return np.array(out)


@pytest.mark.parametrize("k,sigma,T,gate", [(1, 0.5, 1.0, 1.0), (5, 0.1, 2.0, 0.7), (12, 2.0, 0.5, 1.0)])
def test_resmem_matches_brute_force(k, sigma, T, gate):
    rng = np.random.default_rng(k)
    n, m, C, d = 7, 12, 4, 3
    logits, mem_logits = rng.normal(size=(n, C)), rng.normal(size=(m, C)) * 3
    mem_labels, mem_z, q_z = rng.integers(0, C, m), rng.normal(size=(m, d)), rng.normal(size=(n, d))
    expected = brute_force(logits, mem_logits, mem_labels, mem_z, q_z, k, sigma, T, gate)
    given = logits.copy()
    softmax(given, T)
    assert (given == logits).all()  # softmax works in a new array, never in its input

    dist = np.linalg.norm(q_z[:, None] - mem_z[None], axis=2)
    near = np.argsort(dist, axis=1)[:, :k]
    res = residuals(mem_logits, mem_labels, T)
    got = resmem_probs(softmax(logits, T), res[near], np.take_along_axis(dist, near, 1), sigma, gate)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_residuals_sum_to_zero_and_match_onehot():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    r = residuals(logits, np.array([0, 2]), temperature=1.0)
    np.testing.assert_allclose(r.sum(1), 0, atol=1e-6)
    p = softmax(logits)
    np.testing.assert_allclose(r[0], [1 - p[0, 0], -p[0, 1], -p[0, 2]], rtol=1e-6)
    assert r[1, 2] == pytest.approx(1 - 1 / 3)


def test_kernel_weights_favour_nearer_and_normalise():
    w = kernel_weights(np.array([[0.1, 0.2, 0.5]]), sigma=0.1)
    assert w.sum() == pytest.approx(1.0)
    assert w[0, 0] > w[0, 1] > w[0, 2]


def test_per_example_gate():
    probs = np.full((2, 2), 0.5)
    res = np.ones((2, 1, 2))
    out = resmem_probs(probs, res, np.zeros((2, 1)), sigma=1.0, gate=np.array([0.0, 1.0]))
    np.testing.assert_allclose(out, [[0.5, 0.5], [1.5, 1.5]])


def test_confidence_gate_corrects_only_unsure_examples():
    from resmem_ray.core.resmem import confidence_gate

    probs = np.array([[0.95, 0.05], [0.6, 0.4], [0.5, 0.5]])
    assert confidence_gate(probs, 0.7, 0.9).tolist() == [0.0, 0.7, 0.7]
    assert confidence_gate(probs, 0.7, 1.0).tolist() == [0.7, 0.7, 0.7]
    assert confidence_gate(np.array([[1.0, 0.0]]), 1.0, 1.0).tolist() == [1.0]  # 1.0: always


def test_knn_vote_majority_and_ties():
    labels = np.array([[1, 2, 2], [3, 1, 1], [0, 1, 2], [2, 1, 1]])
    assert knn_vote(labels, 4).tolist() == [2, 1, 0, 1]
    # a tie in counts goes to the class whose neighbours rank nearer
    assert knn_vote(np.array([[1, 0, 1, 0]]), 2).tolist() == [1]
    assert knn_vote(np.array([[0, 1, 0, 1]]), 2).tolist() == [0]


def brute_force_interpolation(probs, neighbour_labels, distances, lam, tau):
    """(1 - lambda) p + lambda p_kNN, one query and one neighbour at a time."""
    out = []
    for q in range(len(probs)):
        e = [math.exp(-d / tau) for d in distances[q]]
        p_knn = [0.0] * len(probs[q])
        for i, y in enumerate(neighbour_labels[q]):
            p_knn[y] += e[i] / sum(e)
        out.append([(1 - lam) * probs[q][c] + lam * p_knn[c] for c in range(len(probs[q]))])
    return np.array(out)


@pytest.mark.parametrize("k,lam,tau", [(1, 0.25, 0.1), (6, 0.5, 0.03), (10, 1.0, 2.0), (4, 0.0, 0.5)])
def test_knn_interpolation_matches_brute_force(k, lam, tau):
    from resmem_ray.core.resmem import knn_interpolation

    rng = np.random.default_rng(k)
    n, C = 9, 5
    probs = softmax(rng.normal(size=(n, C)) * 2)
    labels = rng.integers(0, C, (n, k))
    distances = np.sort(rng.random((n, k)), axis=1)
    got = knn_interpolation(probs, labels, distances, lam, tau)
    np.testing.assert_allclose(got, brute_force_interpolation(probs, labels, distances, lam, tau),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.sum(1), 1.0)  # still a distribution


def test_knn_interpolation_by_hand():
    from resmem_ray.core.resmem import knn_interpolation

    # two neighbours at the same distance, both class 2: p_kNN = onehot(2)
    got = knn_interpolation(np.array([[0.6, 0.3, 0.1]]), np.array([[2, 2]]), np.array([[0.4, 0.4]]), 0.5, 0.1)
    np.testing.assert_allclose(got, [[0.3, 0.15, 0.55]])

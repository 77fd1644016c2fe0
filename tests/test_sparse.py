"""The sparse residual codec against the dense computation, and the corrected
distribution that perplexity is measured on."""

import numpy as np
import pytest

from resmem_ray.config import load_config
from resmem_ray.errors import ResMemError
from resmem_ray.tasks.lm import lm_metrics, token_reads
from resmem_ray.core.knn import Neighbours
from resmem_ray.core.resmem import kernel_weights, residuals, softmax
from resmem_ray.core.sparse import (clip_renormalise, corrected_probs, dense_residuals, encode,
                                    sparse_correction, token_metrics)


def random_memory(n=6, k=4, vocab=11, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n * k, vocab)) * 2
    labels = rng.integers(0, vocab, n * k)
    p = softmax(rng.normal(size=(n, vocab)) * 2)
    w = kernel_weights(rng.random((n, k)), 0.3)
    return logits, labels, p, w


def test_encode_keeps_the_top_m_in_order():
    logits, _, _, _ = random_memory()
    ids, probs = encode(logits, 3, temperature=2.0)
    full = softmax(logits, 2.0)
    assert ids.shape == probs.shape == (len(logits), 3) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids, np.argsort(-full, axis=1)[:, :3])
    np.testing.assert_allclose(probs, np.take_along_axis(full, ids, 1), rtol=1e-6)
    assert encode(logits, 1000)[0].shape[1] == logits.shape[1]  # m is capped at the vocabulary


@pytest.mark.parametrize("gate", [0.3, 1.0])
def test_sparse_equals_dense_when_m_covers_the_vocabulary(gate):
    logits, labels, p, w = random_memory()
    n, k = w.shape
    vocab = logits.shape[1]
    ids, probs = encode(logits, vocab, temperature=1.5)
    dense_r = residuals(logits, labels, 1.5).astype(np.float64)
    np.testing.assert_allclose(dense_residuals(labels, ids, probs, vocab), dense_r, atol=1e-6)
    # the dense ResMem correction, summed over a (n, k, V) tensor, then clipped at 0
    expected = p + gate * np.einsum("nk,nkv->nv", w, dense_r.reshape(n, k, vocab))
    expected = np.maximum(expected, 0)
    expected /= expected.sum(1, keepdims=True)
    got = corrected_probs(p, w, labels.reshape(n, k), ids.reshape(n, k, -1), probs.reshape(n, k, -1), gate, 0.0)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_sparse_rows_stand_for_their_truncated_dense_rows():
    """With m < V the correction is the dense one over residual rows whose probabilities
    beyond the top m are zero; only the neighbours' candidate tokens change."""
    logits, labels, p, w = random_memory(vocab=50)
    n, k = w.shape
    ids, probs = encode(logits, 4)
    rows = probs.reshape(n, k, 4).astype(np.float64)
    correction = sparse_correction(w, labels.reshape(n, k), ids.reshape(n, k, 4), rows, 50)
    assert np.array_equal(rows, probs.reshape(n, k, 4))  # not written into, even where no cast copies it
    read_only = [a.copy() for a in (w, labels.reshape(n, k), ids.reshape(n, k, 4), rows)]
    for a in read_only:  # as Ray's object store hands arrays out
        a.flags.writeable = False
    assert np.array_equal(sparse_correction(*read_only, 50), correction)
    truncated = dense_residuals(labels, ids, probs, 50).reshape(n, k, 50)
    np.testing.assert_allclose(correction, np.einsum("nk,nkv->nv", w, truncated), atol=1e-12)
    untouched = np.ones_like(p, dtype=bool)  # the tokens no neighbour names
    rows = np.arange(n)[:, None]
    untouched[rows, labels.reshape(n, k)] = False
    untouched[rows, ids.reshape(n, -1)] = False
    assert untouched.any() and (correction[untouched] == 0).all()
    q = corrected_probs(p, w, labels.reshape(n, k), ids.reshape(n, k, 4), probs.reshape(n, k, 4), 1.0, 1e-3)
    for i in range(n):  # outside the candidates: p, only renormalised
        ratio = q[i][untouched[i]] / p[i][untouched[i]]
        np.testing.assert_allclose(ratio, ratio[0])


@pytest.mark.parametrize("floor", [0.0, 1e-3, 0.1])
def test_corrected_distribution_is_valid(floor):
    logits, labels, p, w = random_memory(n=20, k=5, vocab=30, seed=3)
    ids, probs = encode(logits[:100], 3)
    q = corrected_probs(p, w, labels[:100].reshape(20, 5), ids.reshape(20, 5, 3), probs.reshape(20, 5, 3),
                        gate=2.0, floor=floor)
    assert (q >= 0).all()
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-12)
    if floor > 0:
        assert (q > 0).all()  # every token the base model allows keeps some probability


def test_corrected_distribution_and_perplexity_by_hand():
    p = np.array([[0.5, 0.3, 0.2]])
    # one neighbour (weight 1): label 2, base model's top-1 there: token 0 with 0.6
    # q = p + (onehot(2) - 0.6 onehot(0)) = [-0.1, 0.3, 1.2]
    w, labels, ids, probs = np.ones((1, 1)), np.array([[2]]), np.array([[[0]]]), np.array([[[0.6]]])
    np.testing.assert_allclose(corrected_probs(p, w, labels, ids, probs, 1.0, 0.0), [[0.0, 0.2, 0.8]])
    # floor 0.1: token 0 keeps 0.1 * 0.5 = 0.05 -> [0.05, 0.3, 1.2] / 1.55
    q = corrected_probs(p, w, labels, ids, probs, 1.0, 0.1)
    np.testing.assert_allclose(q, [[0.05 / 1.55, 0.3 / 1.55, 1.2 / 1.55]])
    np.testing.assert_allclose(clip_renormalise(np.array([[-0.1, 0.3, 1.2]]), p, 0.1), q)
    correct, nll, count = token_metrics(np.vstack([q, q]), np.array([2, 1]))
    assert (correct, count) == (1.0, 2)
    assert np.exp(nll / count) == pytest.approx(np.sqrt(1.55 / 1.2 * 1.55 / 0.3))


def test_lm_metrics_base_and_resmem():
    rng = np.random.default_rng(1)
    n, k, m, vocab = 40, 3, 5, 9
    logits = rng.normal(size=(n, vocab))
    labels = rng.integers(0, vocab, n)
    mem_logits = rng.normal(size=(n * k, vocab))
    ids, probs = encode(mem_logits, m)
    nb = Neighbours(distances=np.sort(rng.random((n, k)), 1).astype(np.float32), ids=np.arange(n * k).reshape(n, k),
                    labels=rng.integers(0, vocab, (n, k)), residuals=probs.reshape(n, k, m),
                    residual_ids=ids.reshape(n, k, m))
    cfg = load_config("jobs/configs/bbc_lm.yaml", ("resmem.k=3", "resmem.sigma=0.2", "resmem.gate=0.5",
                                                   "text.prob_floor=0.01"))
    got = lm_metrics(logits, labels, nb, cfg, batch=7)  # several query batches
    p = softmax(logits)
    assert got["base"]["perplexity"] == pytest.approx(np.exp(-np.log(p[np.arange(n), labels]).mean()))
    assert got["base"]["accuracy"] == pytest.approx((p.argmax(1) == labels).mean())
    q = corrected_probs(p, kernel_weights(nb.distances, 0.2), nb.labels, nb.residual_ids, nb.residuals, 0.5, 0.01)
    assert got["resmem"]["perplexity"] == pytest.approx(np.exp(-np.log(q[np.arange(n), labels]).mean()))
    assert got["resmem"]["accuracy"] == pytest.approx((q.argmax(1) == labels).mean())


def test_lm_metrics_knnlm_matches_loops():
    """kNN-LM's row: (1 - lambda) p + lambda p_kNN, p_kNN over the resmem.k nearest next
    tokens weighted by softmax(-d / tau), scored one token at a time."""
    rng = np.random.default_rng(2)
    n, k, m, vocab = 30, 5, 4, 13
    logits = rng.normal(size=(n, vocab)) * 2
    labels = rng.integers(0, vocab, n)
    ids, probs = encode(rng.normal(size=(n * k, vocab)), m)
    nb = Neighbours(distances=np.sort(rng.random((n, k)), 1).astype(np.float32), ids=np.arange(n * k).reshape(n, k),
                    labels=rng.integers(0, vocab, (n, k)), residuals=probs.reshape(n, k, m),
                    residual_ids=ids.reshape(n, k, m))
    lam, tau, T, k_used = 0.4, 0.3, 2.0, 3
    cfg = load_config("jobs/configs/bbc_lm.yaml", (f"resmem.k={k_used}", f"resmem.knn_lambda={lam}",
                                                   f"resmem.knn_tau={tau}", f"resmem.temperature={T}"))
    got = lm_metrics(logits, labels, nb, cfg, batch=8)["knn_interp"]
    correct, nll = 0, 0.0
    for q in range(n):
        z = np.exp((logits[q] - logits[q].max()) / T)
        p = z / z.sum()
        e = np.exp(-nb.distances[q, :k_used].astype(np.float64) / tau)
        p_knn = np.zeros(vocab)
        for i in range(k_used):  # only the first resmem.k neighbours count
            p_knn[nb.labels[q, i]] += e[i] / e.sum()
        mixed = (1 - lam) * p + lam * p_knn
        correct += int(np.argmax(mixed) == labels[q])
        nll -= np.log(mixed[labels[q]])
    assert got["accuracy"] == pytest.approx(correct / n)
    assert got["perplexity"] == pytest.approx(np.exp(nll / n))


def test_lm_confidence_gate_never_reads_the_memory_for_confident_tokens():
    """With resmem.gate_threshold < 1 the tokens whose max p (at T) reaches it are never
    searched: scoring from the neighbours of the other tokens alone equals searching every
    token and gating afterwards, and both equal a dense one-token-at-a-time computation
    (base p kept where the gate is closed, for ResMem and kNN-LM alike)."""
    rng = np.random.default_rng(3)
    n, k, m, vocab, T, thr, gate, floor, lam, tau = 60, 4, 5, 9, 2.0, 0.4, 0.7, 0.01, 0.3, 0.2
    logits = rng.normal(size=(n, vocab)) * rng.uniform(0.5, 8.0, (n, 1))  # confident and unsure tokens
    labels = rng.integers(0, vocab, n)
    ids, probs = encode(rng.normal(size=(n * k, vocab)), m)
    nb = Neighbours(distances=np.sort(rng.random((n, k)), 1).astype(np.float32), ids=np.arange(n * k).reshape(n, k),
                    labels=rng.integers(0, vocab, (n, k)), residuals=probs.reshape(n, k, m),
                    residual_ids=ids.reshape(n, k, m))
    cfg = load_config("jobs/configs/bbc_lm.yaml", (f"resmem.k={k}", "resmem.sigma=0.2", f"resmem.gate={gate}",
                                                   f"resmem.temperature={T}", f"resmem.gate_threshold={thr}",
                                                   f"resmem.knn_lambda={lam}", f"resmem.knn_tau={tau}",
                                                   f"text.prob_floor={floor}"))
    reads = token_reads(logits, cfg.resmem, batch=16)
    p = softmax(logits, T)
    np.testing.assert_array_equal(reads, p.max(1) < thr)
    assert 10 < reads.sum() < n - 10
    searched = Neighbours(*(getattr(nb, f)[reads] for f in ("distances", "ids", "labels", "residuals",
                                                            "residual_ids")))
    skipped = lm_metrics(logits, labels, searched, cfg, reads, batch=7)
    unskipped = lm_metrics(logits, labels, nb, cfg, batch=7)
    want = {"resmem": [], "knn_interp": []}
    for t in range(n):
        q, knn = p[t], p[t]
        if reads[t]:
            w = kernel_weights(nb.distances[t:t + 1], 0.2)[0]
            r = dense_residuals(nb.labels[t], nb.residual_ids[t], nb.residuals[t], vocab)
            q = clip_renormalise((p[t] + gate * w @ r)[None], p[t:t + 1], floor)[0]
            e = np.exp(-nb.distances[t].astype(np.float64) / tau)
            knn = (1 - lam) * p[t] + lam * np.bincount(nb.labels[t], e / e.sum(), minlength=vocab)
        want["resmem"].append(q)
        want["knn_interp"].append(knn)
    for method, rows in want.items():
        q = np.array(rows)
        expected = {"accuracy": (q.argmax(1) == labels).mean(),
                    "perplexity": np.exp(-np.log(q[np.arange(n), labels]).mean())}
        for got in (skipped, unskipped):
            assert got[method] == pytest.approx(expected), method
    assert skipped["base"] == pytest.approx(unskipped["base"])
    with pytest.raises(ResMemError, match="gate_threshold"):  # neighbours that miss an open token
        lm_metrics(logits, labels, searched, cfg, reads & (np.arange(n) != np.argmax(reads)), batch=7)
    always = load_config("jobs/configs/bbc_lm.yaml", ("resmem.gate_threshold=1.0",))
    assert token_reads(logits, always.resmem).all()  # the default reads the memory for every token

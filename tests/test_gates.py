"""Gates (confidence, sigmoid, learned), the long-tail split, per-class reports and the
neighbour Transformer's inputs: plain functions, no Ray."""

import numpy as np
import pytest
import torch

from resmem_ray.tasks.splits import long_tail
from resmem_ray.errors import ResMemError
from resmem_ray.tasks.classification import per_class
from resmem_ray.core.gates import FEATURES, fit_learned_gate, gate_features, learned_gate
from resmem_ray.core.knn import Neighbours
from resmem_ray.tasks.neighbour_model import NeighbourTransformer, neighbour_inputs
from resmem_ray.core.resmem import confidence_gate


def test_sigmoid_gate_is_a_smooth_threshold():
    probs = np.array([[0.99, 0.01], [0.9, 0.1], [0.6, 0.4]])
    hard = confidence_gate(probs, 1.0, 0.9)
    assert hard.tolist() == [0.0, 0.0, 1.0]
    soft = confidence_gate(probs, 0.5, 0.9, softness=0.05)
    assert soft[1] == pytest.approx(0.25)  # at the threshold: half of the gate
    assert soft[0] < 0.1 < 0.45 < soft[2] < 0.5  # confident -> ~0, unsure -> ~gate
    sharp = confidence_gate(probs, 0.5, 0.9, softness=1e-6)
    assert sharp[[0, 2]] == pytest.approx([0.0, 0.5])  # a sharp sigmoid is the hard gate


def _queries(n, rng):
    """Base probs that are unsure (and wrong) exactly where the neighbours disagree with them."""
    labels = rng.integers(0, 3, n)
    wrong = rng.random(n) < 0.3
    base = np.where(wrong, (labels + 1) % 3, labels)
    probs = np.full((n, 3), 0.1)
    probs[np.arange(n), base] = np.where(wrong, 0.45, 0.8)
    probs /= probs.sum(1, keepdims=True)
    nb_labels = np.repeat(labels[:, None], 5, axis=1)
    distances = np.sort(rng.random((n, 5)), axis=1)
    correction = np.eye(3)[labels] - probs
    return probs, nb_labels, distances, correction, labels, wrong


def test_learned_gate_learns_where_the_base_model_is_wrong():
    rng = np.random.default_rng(0)
    probs, nb_labels, distances, correction, labels, wrong = _queries(400, rng)
    features = gate_features(probs, nb_labels, distances, correction)
    assert features.shape == (400, len(FEATURES))
    params = fit_learned_gate(features, wrong)
    g = learned_gate(params, features)
    assert g[wrong].min() > 0.5 > g[~wrong].max()
    gated = (probs + g[:, None] * correction).argmax(1)
    assert (gated == labels).mean() > 0.99 and (probs.argmax(1) == labels).mean() < 0.8


def test_learned_gate_needs_errors_to_learn_from():
    rng = np.random.default_rng(0)
    probs, nb_labels, distances, correction, _, wrong = _queries(50, rng)
    with pytest.raises(ResMemError, match="tune.learned_gate: the base model is wrong on 0 of 50"):
        fit_learned_gate(gate_features(probs, nb_labels, distances, correction), np.zeros(50, bool))


def test_long_tail_profile_is_exponential():
    labels = np.repeat(np.arange(10), 100)
    kept = long_tail(np.arange(1000), labels, 100.0, np.random.default_rng(0))
    counts = np.bincount(labels[kept], minlength=10)
    assert counts[0] == 100 and counts[-1] == 1
    assert np.all(np.diff(counts) <= 0)
    assert counts[5] == int(100 * 100 ** (-5 / 9))


def test_per_class_head_tail_and_worst_class():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = {"base": np.array([0, 0, 1, 0, 0, 0]), "resmem": np.array([0, 0, 1, 1, 2, 0])}
    pc = per_class(labels, preds, train_counts=np.array([50, 10, 5]))
    assert pc["accuracy"]["base"] == [1.0, 0.5, 0.0]
    assert pc["head_classes"] == [0] and pc["tail_classes"] == [1, 2]
    assert pc["tail"]["base"] == 0.25 and pc["tail"]["resmem"] == 0.75
    assert pc["worst_class"] == {"base": 0.0, "resmem": 0.5}


def test_neighbour_inputs_drop_the_query_itself():
    memory_ids = np.array([10, 11, 12, 13])
    memory = np.arange(8, dtype=np.float32).reshape(4, 2)
    nb = Neighbours(distances=np.array([[0.0, 0.1, 0.2], [0.05, 0.0, 0.3]], np.float32),
                    ids=np.array([[11, 10, 13], [12, 13, 10]]), labels=np.array([[1, 0, 3], [2, 3, 0]]),
                    residuals=np.zeros((2, 3, 4), np.float32))
    queries = memory[[1, 3]]
    inputs = neighbour_inputs(queries, np.array([1, 3]), np.array([11, 13]), nb, memory, memory_ids, k=2)
    assert inputs["labels"].tolist() == [[0, 3], [2, 0]]  # own row (11, 13) gone, order kept
    assert inputs["neighbours"][0].tolist() == [memory[0].tolist(), memory[3].tolist()]
    assert np.allclose(inputs["distances"], [[0.1, 0.2], [0.05, 0.3]])
    # not memory rows (val, test): the first k neighbours as they are
    plain = neighbour_inputs(queries, np.array([1, 3]), None, nb, memory, memory_ids, k=2)
    assert plain["labels"].tolist() == [[1, 0], [2, 3]]
    model = NeighbourTransformer(dim=2, num_classes=4, k=2, d_model=16, layers=1, heads=2)
    out = model(*[torch.tensor(inputs[key]) for key in ("query", "neighbours", "labels", "distances")])
    assert out.shape == (2, 4)


def test_retrieval_gate_equals_a_numpy_computation_on_a_small_token_table():
    """A token LM's retrieval gate (tasks/lm.py) against numpy: the target (ResMem raises the
    true token's probability), the features, the logistic fit, the cut-offs and the
    perplexity each cut-off gives. The memory helps the unsure tokens only: the gate opens
    them first, and searching half the tokens beats searching every one."""
    from sklearn.linear_model import LogisticRegression

    from resmem_ray.config import load_config
    from resmem_ray.core.sparse import dense_residuals, encode
    from resmem_ray.tasks.lm import RETRIEVAL_FRACTIONS, fit_retrieval_gate_on_val

    rng = np.random.default_rng(0)
    n, vocab, k, m = 400, 20, 4, 3
    labels = rng.integers(0, vocab, n)
    unsure = rng.random(n) < 0.5
    logits = rng.normal(0, 1, (n, vocab))
    logits[np.arange(n), labels] += np.where(unsure, 0.5, 6.0)  # sure tokens: the model is right already
    nb_labels = np.where(unsure[:, None], labels[:, None], rng.integers(0, vocab, (n, k)))  # ... the memory is not
    ids, probs = encode(rng.normal(0, 1, (n * k, vocab)), m)
    nb = Neighbours(np.sort(rng.random((n, k)), 1).astype(np.float32), np.zeros((n, k), np.int64), nb_labels,
                    probs.reshape(n, k, m), ids.reshape(n, k, m))
    embedding = rng.normal(0, 1, (n, 8)) * (1 + unsure[:, None])
    cfg = load_config("jobs/configs/bbc_lm.yaml", ("resmem.k=4", "resmem.sigma=0.3", "resmem.gate=0.5"))
    r = cfg.resmem
    table = {"val": {"logits": logits, "label": labels, "embedding_norm": np.linalg.norm(embedding, axis=1)},
             "neighbours": nb}
    gate = fit_retrieval_gate_on_val(cfg, table)

    p = np.exp(logits / r.temperature - (logits / r.temperature).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    w = np.exp(-nb.distances / r.sigma)
    w /= w.sum(1, keepdims=True)
    dense = dense_residuals(nb_labels.ravel(), ids, probs, vocab).reshape(n, k, vocab)
    q = np.maximum(p + r.gate * np.einsum("nk,nkv->nv", w, dense), cfg.text.prob_floor * p)
    q /= q.sum(1, keepdims=True)
    logp, logq = np.log(p[np.arange(n), labels]), np.log(q[np.arange(n), labels])
    helps = logq > logp
    assert gate["fit_helped"] == helps.sum() and helps[unsure].mean() > 0.9 > 0.1 > helps[~unsure].mean()
    features = np.column_stack([p.max(1), -(p * np.log(p)).sum(1), np.linalg.norm(embedding, axis=1)])
    mean, scale = features.mean(0), features.std(0) + 1e-9
    model = LogisticRegression(class_weight="balanced", C=1.0, max_iter=1000).fit((features - mean) / scale, helps)
    np.testing.assert_allclose(gate["coef"], model.coef_[0], rtol=1e-6)
    scores = model.predict_proba((features - mean) / scale)[:, 1]
    for row, fraction in zip(gate["val"], [*RETRIEVAL_FRACTIONS, 1.0]):
        assert row["cutoff"] == pytest.approx(np.quantile(scores, 1 - fraction) if fraction < 1 else 0.0)
        opened = scores >= row["cutoff"]
        assert row["searched"] == pytest.approx(opened.mean()) and abs(row["searched"] - fraction) < 0.01
        assert row["perplexity"] == pytest.approx(np.exp(-np.where(opened, logq, logp).mean()), rel=1e-6)
    half, every = gate["val"][RETRIEVAL_FRACTIONS.index(0.5)], gate["val"][-1]
    assert half["perplexity"] < every["perplexity"] < np.exp(-logp.mean())

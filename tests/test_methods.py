"""The method registry (tasks/methods.py): one declaration per report method, read by
every report, the tuner and staleness. Unit tests, no Ray."""

import dataclasses

import numpy as np
import pytest

from resmem_ray.config import load_config
from resmem_ray.core.resmem import knn_interpolation
from resmem_ray.errors import ResMemError
from resmem_ray.pipeline import stage_keys
from resmem_ray.schema import ResMemConfig, TuneConfig
from resmem_ray.tasks.methods import (METHODS, config_keys, method, ordered, rivals, setting, setting_line,
                                      setting_record, title, tuned_baselines)


def test_every_metrics_key_has_one_declaration_and_one_place():
    keys = ["oracle_gate", "resmem", "knn_30", "base", "knn_interp", "knn_5", "learned_gate", "nbr_transformer"]
    assert ordered(keys) == ["base", "knn_5", "knn_30", "knn_interp", "nbr_transformer", "resmem", "learned_gate",
                             "oracle_gate"]
    assert rivals(keys) == ["knn_30", "knn_interp", "knn_5", "nbr_transformer"]  # not base, ResMem or the oracle
    assert method("knn_30") is METHODS["knn"] and title("knn_30") == "30-NN"
    assert title("knn_10", "regression") == "10-NN regression"
    assert title("knn_interp") == "kNN interpolation" and title("knn_interp", "lm") == "kNN-LM"
    with pytest.raises(ResMemError, match="no report method 'knnlm'"):
        method("knnlm")  # one key per method: the old spellings are gone


def test_tuned_baselines_name_real_config_keys_and_score_distributions():
    resmem_keys, tune_keys = {f.name for f in dataclasses.fields(ResMemConfig)}, \
        {f.name for f in dataclasses.fields(TuneConfig)}
    assert [m.key for m in tuned_baselines()] == ["knn_interp"]
    for m in tuned_baselines():
        assert set(m.tuned) <= resmem_keys & tune_keys, m.key  # resmem.<key> its value, tune.<key> its grid
        rng = np.random.default_rng(0)
        p = rng.dirichlet(np.ones(5), 8)
        q = m.probs(p, rng.integers(0, 5, (8, 3)), np.sort(rng.random((8, 3)), 1),
                    {k: 3 if k == "knn_k" else 0.5 for k in m.tuned})
        np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-6)


def test_knn_interp_setting_reads_the_config_and_says_who_chose_it():
    cfg = load_config("jobs/configs/digits.yaml", ("resmem.knn_lambda=0.4", "resmem.knn_tau=0.2"))
    m = METHODS["knn_interp"]
    assert setting(cfg, m) == {"knn_k": cfg.resmem.k, "knn_lambda": 0.4, "knn_tau": 0.2}  # knn_k=0: resmem.k
    record = setting_record(cfg, m, None)
    assert record == {"k": cfg.resmem.k, "lambda": 0.4, "tau": 0.2, "chosen_by": "config"}
    assert setting_record(cfg, m, {"knn_interp": {"knn_lambda": 0.4}})["chosen_by"] == "tune"
    assert setting_line(m, record).endswith(
        f"k={cfg.resmem.k}, lambda=0.4, tau=0.2 (from resmem.knn_k, resmem.knn_lambda, resmem.knn_tau).")
    # its own k: the first knn_k of a deeper search; never more than were searched
    rng = np.random.default_rng(1)
    p, labels, d = rng.dirichlet(np.ones(4), 6), rng.integers(0, 4, (6, 5)), np.sort(rng.random((6, 5)), 1)
    own = setting(load_config("jobs/configs/digits.yaml", ("resmem.knn_k=2", "resmem.knn_lambda=0.4",
                                                           "resmem.knn_tau=0.2")), m)
    np.testing.assert_array_equal(m.probs(p, labels, d, own), knn_interpolation(p, labels[:, :2], d[:, :2], 0.4, 0.2))
    with pytest.raises(ResMemError, match=r"k=6 \(resmem.knn_k\) is more than the 5 neighbours searched"):
        m.probs(p, labels, d, {**own, "knn_k": 6})


@pytest.mark.parametrize("config", ["digits", "bbc_lm", "diabetes"])
def test_a_change_of_a_key_a_method_reads_makes_evaluate_stale(config):
    keys = stage_keys("evaluate", load_config(f"jobs/configs/{config}.yaml"))
    assert all(key in keys for key in config_keys()), [k for k in config_keys() if k not in keys]

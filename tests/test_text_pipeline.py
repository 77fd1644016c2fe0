"""Text through every stage of the CLI, on tiny models: a random BERT classifier on BBC
News and a from-scratch GPT-2 with token-level, sparse ResMem."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from resmem_ray.cli import main
from resmem_ray.config import load_config
from resmem_ray.pipeline import stage_keys
from resmem_ray.stages import tune
from resmem_ray.store.artifacts import read_split
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.methods import neighbour_baselines
from resmem_ray.tasks.text import load_tokenizer, minilm_dir
from resmem_ray.tasks.text_data import load_splits as load_text_splits

BASELINES = [m.key for m in neighbour_baselines()]  # scored from the neighbours by every classifier and the LM
FAST = ["train.epochs=1", "train.num_workers=1", "embed.num_actors=1", "index.num_shards=2", "data.limit=24"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 1-layer BERT classifier with MiniLM's tokenizer (no pretrained weights)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=64)).save_pretrained(str(folder))
    load_tokenizer(str(minilm_dir())).save_pretrained(str(folder))
    return folder


@pytest.mark.timeout(400)
def test_text_classification_run(ray_session, tiny_bert, tmp_path, capsys):
    run_dir = tmp_path / "bbc"
    args = ["--config", "jobs/configs/bbc_news.yaml", f"run_dir={run_dir}", f"text.pretrained={tiny_bert}",
            "text.max_length=32", "text.freeze_encoder=false", "resmem.k=5", "evaluate.knn_ks=[1,5]", *FAST]
    assert main(["run", *args]) == 0
    assert "| ResMem |" in capsys.readouterr().out
    run = RunDir(run_dir)
    meta = json.loads((run.model / "meta.json").read_text())
    assert meta["task"] == "classification" and meta["embedding_dim"] == 32 and meta["num_classes"] == 5
    test = read_split(run, "test", "test")
    assert test["embedding"].shape == (24, 32) and test["logits"].shape == (24, 5)
    metrics = json.loads((run.report / "metrics.json").read_text())
    assert metrics["num_test"] == 24 and metrics["memory_rows"] == 24
    assert set(metrics["accuracy"]) == {"base", "knn_1", "knn_5", *BASELINES, "resmem", "oracle_gate"}
    assert main(["memorize", *args, "--examples", str(tmp_path / "x.npz")]) == 2
    assert "a text run memorizes a .jsonl or .csv of text and label" in capsys.readouterr().err

    # memorize: test articles under new labels; with a narrow kernel ResMem follows them
    cfg = load_config(args[1], tuple(args[2:]))
    texts = load_text_splits(cfg.data, cfg.seed, cfg.text)[0]["test"]
    new_labels = (texts.labels + 1) % 5
    examples = tmp_path / "relabelled.jsonl"
    examples.write_text("".join(json.dumps({"text": t, "label": int(y)}) + "\n" for t, y in zip(texts.texts, new_labels)))
    assert main(["memorize", *args, "--examples", str(examples)]) == 0
    assert main(["evaluate", *args, "resmem.sigma=0.001", "resmem.k=1"]) == 0
    preds = pq.read_table(run.report / "predictions.parquet").to_pandas().set_index("id")
    assert (preds.loc[texts.ids, "resmem"].to_numpy() == new_labels).mean() >= 0.9
    assert (preds.loc[texts.ids, "base"].to_numpy() == new_labels).mean() <= 0.5
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nsome article,7\n")
    assert main(["memorize", *args, "--examples", str(bad)]) == 2
    assert "labels must lie in [0, 5), got 7..7" in capsys.readouterr().err

    # `resmem serve` on the text run answers plain strings as evaluate did
    from ray import serve

    from resmem_ray.stages.serve import start
    from .test_serve import free_port, http

    served = load_config(args[1], (*args[2:], "resmem.sigma=0.001", "resmem.k=1", f"serve.port={free_port()}"))
    try:
        url = start(served)
        status, answer = http(url + "/predict", {"examples": list(texts.texts)})
        assert status == 200, answer
        assert [a["resmem"]["class"] for a in answer["predictions"]] == preds.loc[texts.ids, "resmem"].tolist()
        assert [a["base"]["class"] for a in answer["predictions"]] == preds.loc[texts.ids, "base"].tolist()
        status, answer = http(url + "/predict", {"examples": [""]})
        assert status == 400 and "\n" not in answer["error"], answer
    finally:
        serve.shutdown()


@pytest.mark.timeout(400)
def test_language_model_run_with_sparse_residuals(ray_session, tmp_path, capsys):
    run_dir = tmp_path / "lm"
    args = ["--config", "jobs/configs/bbc_lm.yaml", f"run_dir={run_dir}", "text.max_length=24",
            "text.vocab_size=300", "text.lm_dim=32", "text.lm_heads=2", "text.top_m=8", "resmem.k=4",
            "text.lm_embedding=last_block_input", *FAST, "train.num_workers=2", "train.cpus_per_worker=0.5"]
    assert main(["run", *args]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "| ResMem |" in out and "perplexity" in out and "residual storage" in out.lower()
    # Ray Data's banners and progress bars stay in its log file (`--verbose` shows them)
    assert "Starting execution of Dataset" not in out + captured.err and "\x1b[" not in out + captured.err
    run = RunDir(run_dir)
    train = read_split(run, "train", "test", columns=("id", "label", "embedding", "top_ids", "top_probs"))
    n = len(train["id"])
    assert 24 * 10 < n <= 24 * 23  # one row per next-token prediction, up to max_length - 1 per text
    assert train["embedding"].shape == (n, 32) and train["top_ids"].shape == (n, 8)
    assert np.all(np.diff(train["top_probs"], axis=1) <= 0) and np.all(train["top_probs"].sum(1) <= 1 + 1e-5)
    test = read_split(run, "test", "test", columns=("id", "label", "logits"))
    assert test["logits"].shape[1] == 300  # queries keep their dense logits; the memory does not
    index = json.loads((run.index / "manifest.json").read_text())
    assert index["codec"] == "sparse" and index["top_m"] == 8 and index["rows"] == n
    metrics = json.loads((run.report / "metrics.json").read_text())
    assert metrics["sparse_bytes"] == n * (8 + 8 * (4 + 2))  # float16 probabilities, int32 ids, int64 label
    assert metrics["dense_bytes"] == n * 300 * 2
    for m in ("base", "resmem"):
        assert 0 <= metrics[f"{m}_accuracy"] <= 1 and 1 < metrics[f"{m}_perplexity"] < np.inf
    # a uniform guess over 300 tokens has perplexity 300: one epoch of training beats it
    assert metrics["base_perplexity"] < 300
    assert 1 < metrics["knn_interp_perplexity"] < np.inf and 0 <= metrics["knn_interp_accuracy"] <= 1
    assert set(metrics["accuracy"]) == {"base", *BASELINES, "resmem"} and "| kNN-LM |" in out
    # a deeper LM is a new base model: the run reruns from train, not a reprinted old report
    deeper = load_config(args[1], (*args[2:], "text.lm_layers=4"))
    assert run.stale_reason("train", deeper.to_dict(), stage_keys("train", deeper)) == "config changed"
    assert run.stale_reason("evaluate", run.manifest()["config"], stage_keys("evaluate", deeper)) is None
    # tune: the sparse rows reweighted by val perplexity, then evaluate at the chosen setting
    # two memories (bbc_lm.yaml: squared L2 on raw states and cosine), kNN-LM with its own k
    grid = ["tune.k=[4,16]", "tune.sigma=[0.02,0.3]", "tune.gate=[0.2,1.0]", "tune.knn_k=[2,16]",
            "tune.knn_lambda=[0.25,0.5]", "tune.knn_tau=[0.1,1.0]", "tune.cpus_per_trial=0.5"]
    capsys.readouterr()
    assert main(["tune", *args, *grid]) == 0
    assert "View detailed results" not in capsys.readouterr().out  # Ray Tune's own banner stays out
    summary = json.loads((run_dir / "tune" / "best.json").read_text())
    assert summary["trials"] == 16 and summary["objective"] == "val perplexity"
    knn, chosen = summary["knn_interp"], tune.memory_key(summary["best"]["distance"], False)
    assert knn["trials"] == 8 and summary["best"]["knn_k"] == knn["knn_k"] in (2, 16)
    other = {"sqeuclidean/raw", "cosine"} - {chosen}  # kNN-LM on the memory ResMem did not choose: val only
    assert set(knn["other_memories"]) == other and knn["other_memories"][other.pop()]["trials"] == 8
    assert summary["best_val_perplexity"] < summary["untuned"]["val_perplexity"] < summary["base_val_perplexity"]
    assert min(t["val_perplexity"] for t in summary["top"]) == pytest.approx(summary["best_val_perplexity"])
    tuned = json.loads((run.report / "metrics.json").read_text())
    assert tuned["resmem"]["k"] == summary["best"]["k"] and tuned["resmem"]["knn_lambda"] == summary["best"]["knn_lambda"]
    assert "## Chosen by `resmem tune`" in (run.report / "report.md").read_text()
    # the retrieval gate, fitted on val at the chosen setting: test perplexity and tokens searched per cut-off
    val_rows, test_rows = summary["retrieval_gate"]["val"], tuned["retrieval_gate"]
    assert [row["cutoff"] for row in test_rows] == [row["cutoff"] for row in val_rows] and len(val_rows) == 5
    assert test_rows[-1]["searched"] == 1.0 and test_rows[-1]["perplexity"] == pytest.approx(tuned["resmem_perplexity"])
    assert "## Learned retrieval gate" in (run.report / "report.md").read_text()
    # the confidence gate in evaluate: only the tokens below resmem.gate_threshold are searched
    test_logits = read_split(run, "test", "test", columns=("id", "logits"))["logits"]
    top = np.exp(test_logits - test_logits.max(1, keepdims=True))
    top = (top / top.sum(1, keepdims=True)).max(1)
    threshold = float(np.median(top))
    capsys.readouterr()
    memory = [f"resmem.{key}={summary['best'][key]}" for key in ("distance", "normalize")]  # the index tune left
    assert main(["evaluate", *args, *memory, f"resmem.gate_threshold={threshold}", "evaluate.chunk_mb=4"]) == 0
    gated = json.loads((run.report / "metrics.json").read_text())
    assert gated["memory_read_fraction"] == pytest.approx((top < threshold).mean())
    assert f"{len(top)}/{len(top)} test rows scored, {(top < threshold).sum()} searched" in capsys.readouterr().out
    assert gated["base_perplexity"] == pytest.approx(metrics["base_perplexity"])

    # reproducible: the same config and seed train the same weights and losses, bit for bit, over
    # two DDP workers on CPU (each rank's data order is seeded), so every base metric is the same
    again = RunDir(tmp_path / "again")
    assert main(["train", *args, f"run_dir={again.root}"]) == 0
    assert (again.model / "model.safetensors").read_bytes() == (run.model / "model.safetensors").read_bytes()
    histories = [[{k: v for k, v in epoch.items() if k != "epoch_s"}  # all but the time an epoch took
                  for epoch in json.loads((r.model / "history.json").read_text())] for r in (run, again)]
    assert histories[0] == histories[1] and histories[0][0]["val_loss"] > 0


"""A Hugging Face model trained elsewhere (model.source=checkpoint): a causal LM folder
through the token memory, a sequence classifier taken as it is, and every wrong folder
refused in one line before the run directory changes."""

import json
import shutil

import numpy as np
import pytest
import torch

from resmem_ray.cli import main
from resmem_ray.config import load_config
from resmem_ray.pipeline import stage_keys
from resmem_ray.store.artifacts import read_model_meta
from resmem_ray.store.files import file_hashes
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.text import load_text_model, load_tokenizer, minilm_dir, train_bpe
from resmem_ray.tasks.text_data import load_splits as load_text_splits

LM = "jobs/configs/given_causal_lm.yaml"
FAST = ["embed.num_actors=1", "index.num_shards=2", "data.limit=24", "text.max_length=24", "text.top_m=8",
        "resmem.k=4"]


def gpt2(folder, vocab: int, positions: int = 32, tokenizer=None):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(str(folder))
    if tokenizer is not None:
        shutil.copytree(tokenizer, folder, dirs_exist_ok=True)
    return folder


def bert_classifier(folder, num_labels: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                             num_labels=num_labels)).save_pretrained(str(folder))
    load_tokenizer(str(minilm_dir())).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A random 2-layer GPT-2 with a byte-level BPE tokenizer beside it, and the wrong folders."""
    root = tmp_path_factory.mktemp("given")
    cfg = load_config(LM, ("data.limit=24",))
    train_bpe(load_text_splits(cfg.data, cfg.seed, cfg.text)[0]["train"].texts, 300, root / "bpe")
    vocab = len(load_tokenizer(str(root / "bpe")))
    (root / "empty").mkdir()
    (root / "no_weights").mkdir()
    gpt2(root / "lm", vocab, tokenizer=root / "bpe")
    shutil.copy(root / "lm" / "config.json", root / "no_weights")
    shutil.copytree(root / "lm", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return {"root": root, "vocab": vocab, "lm": root / "lm", "empty": root / "empty",
            "no_weights": root / "no_weights", "truncated": root / "truncated", "no_tokenizer": gpt2(root / "no_tokenizer", vocab),
            "small_vocab": gpt2(root / "small_vocab", vocab // 2, tokenizer=root / "bpe"),
            "classifier": bert_classifier(root / "classifier", 5), "three_labels": bert_classifier(root / "three", 3)}


@pytest.fixture(scope="module")
def lm_run(ray_session, folders, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("given_lm") / "run"
    args = ["--config", LM, f"run_dir={run_dir}", f"model.path={folders['lm']}", *FAST]
    assert main(["run", *args]) == 0
    return run_dir, args


def snapshot(run_dir):
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_given_causal_lm_run(lm_run, folders, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run_dir, args = lm_run
    run = RunDir(run_dir)
    meta = read_model_meta(run, needed_by="test")
    assert meta["task"] == "lm" and meta["embedding_dim"] == 32 and meta["num_classes"] == folders["vocab"]
    assert meta["architecture"] == "GPT2LMHeadModel" and meta["layers"] == 2 and meta["max_length"] == 24
    # nothing trained: RUN/model holds the given weights and tokenizer, no history
    given, saved = load_file(folders["lm"] / "model.safetensors"), load_file(run.model / "model.safetensors")
    assert set(given) == set(saved) and all(torch.equal(given[k], saved[k]) for k in given)
    assert not (run.model / "history.json").exists() and not (run_dir / "tokenizer").exists()
    assert len(load_tokenizer(str(run.model))) == folders["vocab"]
    entry = run.manifest()["stages"]["train"]
    assert list(entry["sources"]) == [str(folders["lm"])]
    report = (run.report / "report.md").read_text()
    assert "| ResMem |" in report and f"GPT2LMHeadModel of {folders['lm']}, 2 layers, 32 dims" in report
    metrics = json.loads((run.report / "metrics.json").read_text())
    assert 1 < metrics["resmem_perplexity"] < np.inf

    # the base perplexity is the given model's own on the test texts
    cfg = load_config(args[1], tuple(args[2:]))
    texts = load_text_splits(cfg.data, cfg.seed, cfg.text)[0]["test"].texts
    tok = load_tokenizer(str(folders["lm"]))
    enc = tok(list(texts), truncation=True, max_length=24, padding="max_length", return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(str(folders["lm"]), local_files_only=True).eval()
    with torch.inference_mode():
        logits = model(**enc).logits[:, :-1]
    target = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                            ignore_index=-100)
    assert metrics["num_test_tokens"] == int((target != -100).sum())
    assert metrics["base_perplexity"] == pytest.approx(float(torch.exp(nll)), rel=1e-4)
    # the same folder again: every stage is done, nothing reruns
    stages = run.manifest()["stages"]
    assert main(["run", *args]) == 0
    assert run.manifest()["stages"] == stages


def refused(run_dir, argv, capsys) -> str:
    """The one line a bad folder gets, with the run directory left as it was."""
    before = snapshot(run_dir)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert snapshot(run_dir) == before and "\n" not in err and "Traceback" not in err
    return err


def test_wrong_given_folders_are_refused(lm_run, folders, capsys):
    run_dir, args = lm_run
    f = {k: str(v) for k, v in folders.items() if k != "vocab"}

    def lm(key, *extra):
        return refused(run_dir, ["train", *args, f"model.path={f[key]}", *extra], capsys)

    assert lm("empty") == (f"resmem: error: model.path={f['empty']}: not a loadable transformers model: "
                           f"Unrecognized model in {f['empty']}. Should have a `model_type` key in its config.json.")
    assert lm("no_weights").startswith(f"resmem: error: model.path={f['no_weights']}: not a loadable "
                                       "AutoModelForCausalLM: ")
    assert lm("truncated").startswith(f"resmem: error: model.path={f['truncated']}: not a loadable "
                                      "AutoModelForCausalLM: Error while deserializing header")
    assert lm("classifier") == (f"resmem: error: model.path={f['classifier']} holds a BertForSequenceClassification, "
                                "not a model for model.name=gpt2_lm (AutoModelForCausalLM)")
    assert lm("no_tokenizer").startswith(f"resmem: error: model.path={f['no_tokenizer']} holds no tokenizer (none of ")
    half = folders["vocab"] // 2
    assert lm("small_vocab") == (f"resmem: error: model.path={f['small_vocab']}: the tokenizer has {folders['vocab']} "
                                 f"tokens, the model's input embedding {half} rows: not the model's tokenizer")
    assert lm("lm", "text.max_length=64") == "resmem: error: text.max_length=64 is over the model's 32 positions"
    missing = str(folders["root"] / "nope")
    assert lm("lm", f"model.path={missing}") == f"resmem: error: model.path={missing}: no such file or folder"

    def classifier(key):
        return refused(run_dir, ["train", "--config", "jobs/configs/given_hf_classifier.yaml", f"run_dir={run_dir}",
                                 f"model.path={f[key]}", "data.limit=24", "text.max_length=32"], capsys)

    assert classifier("lm") == (f"resmem: error: model.path={f['lm']} holds a GPT2LMHeadModel, not a model for "
                                "model.name=hf_classifier (AutoModelForSequenceClassification)")
    assert classifier("three_labels") == (f"resmem: error: model.path={f['three_labels']}: the classifier has 3 "
                                          "labels (num_labels), the data 5 classes (data.name=bbc_news)")


def test_given_classifier_is_taken_as_it_is(ray_session, folders, tmp_path):
    """The train stage writes the given classifier as a trained one; embed reads it unchanged."""
    run_dir = tmp_path / "cls"
    args = ["--config", "jobs/configs/given_hf_classifier.yaml", f"run_dir={run_dir}",
            f"model.path={folders['classifier']}", "data.limit=24", "text.max_length=32"]
    assert main(["train", *args]) == 0
    run = RunDir(run_dir)
    model, tokenizer, meta = load_text_model(run)
    assert meta["task"] == "classification" and meta["num_classes"] == 5 and meta["embedding_dim"] == 32
    assert meta["pretrained"] == str(folders["classifier"]) and file_hashes(run.model)
    from transformers import AutoModelForSequenceClassification

    given = AutoModelForSequenceClassification.from_pretrained(str(folders["classifier"]), local_files_only=True)
    enc = load_tokenizer(tokenizer)(["a given model", "taken as it is"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(model(**enc).logits, given.eval()(**enc).logits)


def test_any_causal_lm_folder(ray_session, folders, tmp_path):
    """A Llama-style folder (its tokenizer padding on the left) through the token memory's
    train stage and embedder: the rows are the model's own, position by position."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from resmem_ray.tasks.lm import LMEmbedder
    from resmem_ray.tasks.text import tokenize_batch

    folder = tmp_path / "llama"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=folders["vocab"], hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=32)).eval()
    model.save_pretrained(str(folder))
    left = AutoTokenizer.from_pretrained(str(folders["root"] / "bpe"), local_files_only=True)
    left.padding_side = "left"
    left.save_pretrained(str(folder))
    run_dir = tmp_path / "run"
    assert main(["train", "--config", LM, f"run_dir={run_dir}", f"model.path={folder}", *FAST]) == 0
    meta = read_model_meta(RunDir(run_dir), needed_by="test")
    assert meta["architecture"] == "LlamaForCausalLM" and meta["embedding_dim"] == 32
    assert meta["num_classes"] == folders["vocab"] and meta["layers"] == 2
    texts = np.array(["a short one", "a somewhat longer text about the news of the day"], dtype=object)
    batch = tokenize_batch({"id": np.arange(2), "label": np.zeros(2, np.int64), "text": texts},
                           str(RunDir(run_dir).model), 24)
    rows = LMEmbedder(str(run_dir), temperature=1.0, num_threads=1, keep_logits=True, top_m=8,
                      layer="last_block_input")(batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask[:, 0].all() and not mask[0, -1]  # padded on the right: positions from the left
    text, pos = np.nonzero(mask[:, 1:])
    with torch.inference_mode():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    assert np.array_equal(rows["label"], ids[text, pos + 1])
    assert np.allclose(rows["logits"], out.logits[text, pos].numpy(), atol=1e-5)
    assert np.allclose(rows["embedding"], out.hidden_states[-2][text, pos].numpy(), atol=1e-5)
    final = LMEmbedder(str(run_dir), temperature=1.0, num_threads=1, keep_logits=True, top_m=8, layer="final")(batch)
    assert np.allclose(final["embedding"], out.hidden_states[-1][text, pos].numpy(), atol=1e-5)  # the final norm's output
    assert np.allclose(final["logits"], rows["logits"], atol=1e-5)


def test_keys_that_only_shape_a_trained_model_leave_a_given_one_current():
    trained = load_config("jobs/configs/bbc_lm.yaml")
    given = load_config("jobs/configs/given_causal_lm.yaml", ("model.path=models/lm",))
    assert "text.lm_dim" in stage_keys("train", trained) and "text.lm_dim" not in stage_keys("train", given)
    assert "text.max_length" in stage_keys("embed", given)  # the given model still reads it

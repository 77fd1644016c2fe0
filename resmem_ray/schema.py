"""The run configuration's schema: nested dataclasses, one per section, every key with
its default, its meaning and its rules, declared on the field:

- `range`: the interval a number (each number of a list) lies in, "(0, inf)" positive;
  every numeric key declares one ("(-inf, inf)": any finite value);
- `choices`: the values a key (each element of a list) may take; `non_empty` for lists;
- `stages`: the stages whose outputs follow from the key (on a section: all its keys);
  `by_task`: the task says which stage reads it (Task.reads), e.g. the text.* keys;
- `resource`: the key says where and how fast work runs, not what it computes, so
  changing it never makes a stage's outputs stale.

config.py checks values by these rules; pipeline.stage_keys derives what makes a stage
stale from them.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

POSITIVE, NON_NEGATIVE, FRACTION, UNIT = "(0, inf)", "[0, inf)", "[0, 1)", "[0, 1]"
SEARCH = ("transformer", "tune", "evaluate")  # the stages that search the memory


def setting(default, *, range: str | None = None, choices: tuple = (), non_empty: bool = False,
            stages: tuple[str, ...] = (), by_task: bool = False, resource: bool = False):
    """A field with its rules (a list default is copied for each Config)."""
    metadata = {"range": range, "choices": choices, "non_empty": non_empty, "stages": stages, "by_task": by_task,
                "resource": resource}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def resource(default, *, range: str | None = None):
    """A field that places or sizes work without changing its result."""
    return setting(default, range=range, resource=True)


def section(cls, *, stages: tuple[str, ...] = (), by_task: bool = False):
    """A section whose keys all belong to `stages` (or are read by the task)."""
    return field(default_factory=cls, metadata={"stages": stages, "by_task": by_task})


@dataclass
class DataConfig:
    name: str = "digits"  # a dataset of the task (tasks/): digits, fashion_mnist, cifar10, bbc_news, diabetes, ...
    root: Optional[str] = None  # dataset folder (fashion_mnist, cifar*, imagefolder)
    download: bool = False  # torchvision datasets only; needs network access
    val_fraction: float = setting(0.1, range=FRACTION)  # of the source train split, held out of training and memory
    test_fraction: float = setting(0.2, range=FRACTION)  # only for datasets without an official test split (digits)
    limit: Optional[int] = setting(None, range=POSITIVE)  # cap on examples per split, for quick runs
    image_size: int = setting(224, range=POSITIVE)  # imagefolder only: images are resized and centre-cropped to this
    augment: bool = False  # random crop + flip during training (CIFAR / ImageNet recipes)
    # long tail: >1 subsamples train classes exponentially (CIFAR-LT)
    imbalance_ratio: float = setting(1.0, range="[1, inf)")


@dataclass
class ModelConfig:
    name: str = "small_cnn"  # picks the task (tasks/): small_cnn, resnet20, hf_classifier, gpt2_lm, mlp, ...
    width: int = setting(16, range=POSITIVE)  # small_cnn: first conv channels; cifar resnets: multiplier of 16
    # where the base model comes from: `trained` by the train stage from model.name's recipe;
    # `checkpoint`: a model trained elsewhere (model.path), taken as it is; `precomputed`:
    # the embeddings, logits and labels of every split, computed elsewhere (model.path)
    source: str = setting("trained", choices=("trained", "checkpoint", "precomputed"))
    path: Optional[str] = None  # checkpoint: a weights file or a Hugging Face folder; precomputed: the splits' folder
    arch: Optional[str] = None  # model.name=torchvision: the torchvision.models architecture (efficientnet_b0, vit_b_16, ...)
    embedding_layer: Optional[str] = None  # checkpoint: the module whose input is the embedding (default: the final classifier)


@dataclass
class PreprocessConfig:
    """How a given vision model's images become its input (model.source=checkpoint): resized,
    centre-cropped, normalised. The suite's own models are fed as they are trained; a Hugging
    Face folder with an image processor is fed through it. The image task says which stage
    reads each key (Task.reads): the sizes fix the model's input (train), mean and std embed."""

    # data: no resize, the dataset's mean and std (as the suite trains) | weights: the transforms
    # of the architecture's published torchvision weights (get_model_weights(arch).DEFAULT)
    preset: str = setting("data", choices=("data", "weights"))
    resize: Optional[int] = setting(None, range=POSITIVE)  # short side in pixels, before the crop (null: the preset's)
    crop: Optional[int] = setting(None, range=POSITIVE)  # centre square kept, in pixels (null: the preset's)
    mean: list[float] = setting([], range="(-inf, inf)")  # per channel of the [0, 1]-scaled images (empty: the preset's)
    std: list[float] = setting([], range=POSITIVE)  # per channel (empty: the preset's)


@dataclass
class TrainConfig:
    epochs: int = setting(10, range=POSITIVE)
    batch_size: int = setting(64, range=POSITIVE)  # per worker
    lr: float = setting(0.05, range=POSITIVE)
    momentum: float = setting(0.9, range=FRACTION)
    weight_decay: float = setting(5e-4, range=NON_NEGATIVE)
    num_workers: int = setting(2, range=POSITIVE)  # Ray Train workers (DDP ranks)
    use_gpu: bool = resource(False)
    cpus_per_worker: float = resource(1.0, range=POSITIVE)


@dataclass
class TextConfig:
    """Text data and models (data.name bbc_news | tweets | hf; model.name hf_classifier | gpt2_lm)."""

    # data.name=hf: a hub name, or a local .parquet / .jsonl / .csv file or save_to_disk dir
    hf_path: Optional[str] = None
    hf_subset: Optional[str] = None  # hub dataset config, e.g. sst2 of glue
    train_split: str = "train"
    test_split: Optional[str] = "test"  # null: carve the test split out of train (data.test_fraction)
    text_column: str = "text"
    label_column: Optional[str] = "label"  # null: unlabelled text (language modelling only)
    max_length: int = setting(128, range=POSITIVE)  # tokens per example; longer texts are truncated
    pretrained: Optional[str] = None  # hf_classifier: model folder or hub name; null: the packaged MiniLM
    freeze_encoder: bool = False  # hf_classifier: train the head (and pooler) only
    # gpt2_lm: pretrained (MiniLM's WordPiece, or text.pretrained's) | bpe (trained)
    tokenizer: str = setting("pretrained", choices=("pretrained", "bpe"))
    vocab_size: int = setting(2048, range=POSITIVE)  # gpt2_lm with tokenizer=bpe: size of the trained BPE vocabulary
    lm_layers: int = setting(2, range=POSITIVE)  # gpt2_lm: a GPT-2 config trained from scratch
    lm_dim: int = setting(128, range=POSITIVE)
    lm_heads: int = setting(4, range=POSITIVE)
    # gpt2_lm token embedding: final (hidden state) | last_block_input
    lm_embedding: str = setting("final", choices=("final", "last_block_input"))
    top_m: int = setting(32, range=POSITIVE)  # gpt2_lm sparse residual codec: base-model probabilities kept per token
    # gpt2_lm: corrected probabilities are clipped below at prob_floor * p(v)
    prob_floor: float = setting(1e-3, range=FRACTION)


@dataclass
class EmbedConfig:
    batch_size: int = resource(256, range=POSITIVE)
    num_actors: int = resource(2, range=POSITIVE)  # Ray Data actor pool size: one model replica per actor
    cpus_per_actor: float = resource(0.5, range=POSITIVE)
    gpus_per_actor: float = resource(0.0, range=NON_NEGATIVE)


@dataclass
class IndexConfig:
    num_shards: int = setting(2, range=POSITIVE, stages=("index",))
    # FAISS factory string: Flat, IVF1024,Flat, IVF1024,PQ16, HNSW32, ...
    factory: str = setting("Flat", stages=("index",))
    train_sample: int = setting(100_000, range=POSITIVE, stages=("index",))  # rows sampled per shard to train IVF / PQ
    nprobe: int = setting(16, range=POSITIVE, stages=SEARCH)  # IVF: inverted lists visited per query
    ef_search: int = setting(64, range=POSITIVE, stages=SEARCH)  # HNSW: breadth of the search
    # faiss | torch (exact: matrix multiply + top-k, GPU when present)
    # | torch_lowp (exact too: a bfloat16 scan, its candidates re-ranked in float32)
    backend: str = setting("faiss", choices=("faiss", "torch", "torch_lowp"), stages=SEARCH)
    use_gpu: bool = resource(False)  # shard actors ask Ray for a GPU; CPU fallback (logged) without one
    replicas: int = resource(1, range=POSITIVE)  # actors per shard; query batches are balanced across them
    cpus_per_shard: float = resource(0.5, range=POSITIVE)  # CPU share of each shard actor (also its FAISS threads)
    # shards one actor holds: more shards than cores want several each
    shards_per_actor: int = resource(1, range=POSITIVE)
    placement_timeout_s: float = resource(120.0, range=POSITIVE)  # fail when shard actors cannot all start in time
    # float16 halves the memory's residual rows (ImageNet: 2.6 GB); int8 quarters them (a scale per row)
    residual_dtype: str = setting("float32", choices=("float32", "float16", "int8"), stages=("index",))
    # write each shard's full-precision vectors beside it (shard-NNNNN.vectors.npy) for index.rerank
    keep_vectors: bool = setting(False, stages=("index",))
    # > 1: a compressed index proposes rerank * k candidates, their exact distances (the kept
    # vectors, memory-mapped) pick the k
    rerank: int = setting(1, range=POSITIVE, stages=SEARCH)


DISTANCES = ("l2", "sqeuclidean", "cosine")


@dataclass
class ResMemConfig:
    k: int = setting(20, range=POSITIVE, stages=("evaluate",))  # neighbours whose residuals are summed
    sigma: float = setting(0.5, range=POSITIVE, stages=("evaluate",))  # kernel temperature: softmax(-d / sigma)
    # T in p = softmax(logits / T), used for residuals and prediction; the task says which
    # stage computes residuals at it
    temperature: float = setting(1.0, range=POSITIVE, by_task=True)
    gate: float = setting(1.0, range=NON_NEGATIVE, stages=("evaluate",))  # lambda: weight of the memory's correction
    # confidence gate: correct only where max p(x) < this (1.0: always)
    gate_threshold: float = setting(1.0, range=POSITIVE, stages=("evaluate",))
    # 0: hard threshold; > 0: sigmoid((threshold - max p) / softness)
    gate_softness: float = setting(0.0, range=NON_NEGATIVE, stages=("evaluate",))
    distance: str = setting("l2", choices=DISTANCES, stages=("index",))
    normalize: bool = setting(True, stages=("index",))  # L2-normalise embeddings before indexing and search
    # baseline from the same memory: (1 - knn_lambda) p + knn_lambda p_kNN, p_kNN the knn_k nearest
    # neighbours' labels weighted by softmax(-d / knn_tau) (kNN interpolation; kNN-LM for gpt2_lm)
    knn_k: int = setting(0, range=NON_NEGATIVE, stages=("evaluate",))  # 0: resmem.k
    knn_lambda: float = setting(0.25, range=UNIT, stages=("evaluate",))
    knn_tau: float = setting(0.1, range=POSITIVE, stages=("evaluate",))


@dataclass
class TuneConfig:
    """The search space of `resmem tune` (scored on the validation split)."""

    # grid: every combination | random, optuna: num_samples draws from the ranges
    search: str = setting("grid", choices=("grid", "random", "optuna"))
    num_samples: int = setting(100, range=POSITIVE)  # random and optuna only
    k: list[int] = setting([1, 5, 10, 20, 30, 50], range=POSITIVE, non_empty=True)
    sigma: list[float] = setting([0.01, 0.03, 0.1, 0.3, 1.0], range=POSITIVE, non_empty=True)
    temperature: list[float] = setting([1.0, 2.0, 4.0, 8.0], range=POSITIVE, non_empty=True)
    gate: list[float] = setting([0.5, 1.0], range=POSITIVE, non_empty=True)
    gate_threshold: list[float] = setting([1.0], range=POSITIVE, non_empty=True)  # e.g. [0.8, 0.9, 1.0]
    gate_softness: list[float] = setting([0.0], range=NON_NEGATIVE, non_empty=True)  # e.g. [0.0, 0.05]
    # each distance x normalize pair is one index build + val search
    distance: list[str] = setting(["l2"], choices=DISTANCES, non_empty=True)
    normalize: list[bool] = setting([True], non_empty=True)
    learned_gate: bool = True  # fit a logistic gate on val at the best setting (a report row)
    # the kNN interpolation baseline, tuned on val too: a grid at the best T, same neighbour table;
    # its own k from tune.knn_k (empty: ResMem's chosen k)
    knn_k: list[int] = setting([], range=POSITIVE)
    knn_lambda: list[float] = setting([0.1, 0.25, 0.5, 0.75, 1.0], range=UNIT, non_empty=True)
    knn_tau: list[float] = setting([0.01, 0.03, 0.1, 0.3, 1.0], range=POSITIVE, non_empty=True)
    cpus_per_trial: float = resource(0.25, range=POSITIVE)
    evaluate: bool = True  # then rebuild the index at the best setting and evaluate once on test


@dataclass
class NeighbourTransformerConfig:
    """The memorization study's Transformer over a query and its k nearest neighbours."""

    # train it (after index) and report it beside k-NN and ResMem
    enabled: bool = setting(False, stages=("evaluate",))
    k: int = setting(10, range=POSITIVE)
    d_model: int = setting(64, range=POSITIVE)
    layers: int = setting(2, range=POSITIVE)
    heads: int = setting(4, range=POSITIVE)
    epochs: int = setting(20, range=POSITIVE)
    batch_size: int = setting(128, range=POSITIVE)  # per worker
    lr: float = setting(1e-3, range=POSITIVE)
    num_workers: int = setting(1, range=POSITIVE)  # Ray Train workers
    cpus_per_worker: float = resource(1.0, range=POSITIVE)


@dataclass
class SweepConfig:
    """`resmem sweep`: the whole pipeline per base-model setting, ASHA over epochs."""

    width: list[int] = setting([2, 4, 8, 16], range=POSITIVE, non_empty=True)
    lr: list[float] = setting([], range=POSITIVE)  # empty: train.lr
    seeds: list[int] = setting([], range=NON_NEGATIVE)  # empty: seed; each seed is a trial per width and lr
    rungs: list[int] = setting([3, 10], range=POSITIVE, non_empty=True)  # epochs at which ASHA may stop a trial
    reduction_factor: int = setting(2, range="(1, inf)")
    tune_resmem: bool = True  # per trial, ResMem's setting is the best of the tune.* grid on val
    max_concurrent: int = resource(2, range=POSITIVE)  # trials at once; each trial's stages ask Ray for their CPUs
    cpus_per_trial: float = resource(0.1, range=POSITIVE)  # the trial process only drives the stages


@dataclass
class EvaluateConfig:
    knn_ks: list[int] = setting([1, 10, 20, 30], range=POSITIVE, non_empty=True)
    batch_size: int = resource(1024, range=POSITIVE)  # queries per lookup round trip
    # test rows read, searched and scored at a time: the driver holds one chunk, never the split
    chunk_mb: float = resource(256.0, range=POSITIVE)


@dataclass
class ServeConfig:
    """`resmem serve`: the Ray Serve application over a finished run (no stage's outputs
    follow from these keys)."""

    host: str = resource("127.0.0.1")  # where the HTTP proxy listens; 0.0.0.0 exposes it to the network
    port: int = resource(8000, range="(0, 65535]")
    replicas: int = resource(1, range=POSITIVE)  # model replicas (each embeds and scores batches)
    cpus: float = resource(0.25, range=POSITIVE)  # per model replica
    gpus: float = resource(0.0, range=NON_NEGATIVE)  # per model replica
    max_batch_size: int = resource(32, range=POSITIVE)  # requests a model replica embeds together (serve.batch)
    batch_wait_timeout_s: float = resource(0.005, range=NON_NEGATIVE)  # how long a replica waits to fill a batch
    token: Optional[str] = resource(None)  # the bearer token of POST /memorize (prefer token_file:
    #                                        a config is recorded in the run's manifest by other stages)
    token_file: Optional[str] = resource(None)  # a file holding the token (its first line)
    open_memorize: bool = resource(False)  # true: POST /memorize without a token (trusted networks only)
    max_request_bytes: int = resource(8 * 2**20, range=POSITIVE)  # larger request bodies get 413
    max_examples: int = resource(256, range=POSITIVE)  # examples per request; more get 413
    # Ray Serve's throughput-optimised mode: each ingress replica also answers HTTP on its
    # own port (from 30000, RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT), skipping the proxy's hop;
    # read when Ray starts, so a cluster sets RAY_SERVE_THROUGHPUT_OPTIMIZED=1 itself
    direct_ingress: bool = resource(True)
    shard_actors: bool = resource(False)  # true: shard actors (index.*) search the memory, not the memory replica


@dataclass
class Config:
    run_dir: str = resource("runs/digits")  # where the run's outputs go, not what they are
    seed: int = setting(0, range=NON_NEGATIVE, stages=("train",))
    data: DataConfig = section(DataConfig, stages=("train",))
    model: ModelConfig = section(ModelConfig, stages=("train",))
    preprocess: PreprocessConfig = section(PreprocessConfig, by_task=True)
    train: TrainConfig = section(TrainConfig, stages=("train",))
    embed: EmbedConfig = section(EmbedConfig)
    index: IndexConfig = section(IndexConfig)
    resmem: ResMemConfig = section(ResMemConfig)
    tune: TuneConfig = section(TuneConfig, stages=("tune",))
    neighbour_transformer: NeighbourTransformerConfig = section(NeighbourTransformerConfig, stages=("transformer",))
    sweep: SweepConfig = section(SweepConfig, stages=("sweep",))
    text: TextConfig = section(TextConfig, by_task=True)
    evaluate: EvaluateConfig = section(EvaluateConfig, stages=("evaluate",))
    serve: ServeConfig = section(ServeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def get_key(cfg: Config, key: str):
    """The value of a dotted key, e.g. get_key(cfg, "resmem.sigma")."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


@dataclass(frozen=True)
class Rules:
    """A leaf key's rules, its section's stages and by_task included."""

    type: Any
    range: str | None
    choices: tuple
    non_empty: bool
    stages: tuple[str, ...]
    by_task: bool
    resource: bool


def _rules(cls, prefix: str, stages: tuple[str, ...], by_task: bool) -> dict[str, Rules]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        m = f.metadata
        own_stages, own_by_task = (*stages, *m.get("stages", ())), by_task or m.get("by_task", False)
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_rules(hints[f.name], f"{prefix}{f.name}.", own_stages, own_by_task))
        else:
            out[prefix + f.name] = Rules(hints[f.name], m.get("range"), m.get("choices", ()),
                                         m.get("non_empty", False), own_stages, own_by_task, m.get("resource", False))
    return out


RULES: dict[str, Rules] = _rules(Config, "", (), False)  # every leaf key, in declaration order


def leaf_keys() -> list[tuple[str, bool]]:
    """Every leaf key of the schema as (dotted key, is a resource key), in declaration order."""
    return [(key, rules.resource) for key, rules in RULES.items()]

"""The run configuration's schema: nested dataclasses, one per section, every key with
its default and meaning. Keys marked `resource` say where and how fast work runs, not
what it computes: changing them never makes a stage's outputs stale.

Loading and checking a config file: config.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional


def resource(default):
    """A field that places or sizes work without changing its result."""
    return field(default=default, metadata={"resource": True})


@dataclass
class DataConfig:
    name: str = "digits"  # a dataset of the task (tasks/): digits, fashion_mnist, cifar10, bbc_news, diabetes, ...
    root: Optional[str] = None  # dataset folder (fashion_mnist, cifar*, imagefolder)
    download: bool = False  # torchvision datasets only; needs network access
    val_fraction: float = 0.1  # of the source train split, held out of training and memory
    test_fraction: float = 0.2  # only for datasets without an official test split (digits)
    limit: Optional[int] = None  # cap on examples per split, for quick runs
    image_size: int = 224  # imagefolder only: images are resized and centre-cropped to this
    augment: bool = False  # random crop + flip during training (CIFAR / ImageNet recipes)
    imbalance_ratio: float = 1.0  # long tail: >1 subsamples train classes exponentially (CIFAR-LT)


@dataclass
class ModelConfig:
    name: str = "small_cnn"  # picks the task (tasks/): small_cnn, resnet20, hf_classifier, gpt2_lm, mlp, ...
    width: int = 16  # small_cnn: first conv channels; cifar resnets: multiplier of 16


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64  # per worker
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    num_workers: int = 2  # Ray Train workers (DDP ranks)
    use_gpu: bool = resource(False)
    cpus_per_worker: float = resource(1.0)


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
    max_length: int = 128  # tokens per example; longer texts are truncated
    pretrained: Optional[str] = None  # hf_classifier: model folder or hub name; null: the packaged MiniLM
    freeze_encoder: bool = False  # hf_classifier: train the head (and pooler) only
    tokenizer: str = "pretrained"  # gpt2_lm: pretrained (MiniLM's WordPiece, or text.pretrained's) | bpe (trained)
    vocab_size: int = 2048  # gpt2_lm with tokenizer=bpe: size of the trained byte-level BPE vocabulary
    lm_layers: int = 2  # gpt2_lm: a GPT-2 config trained from scratch
    lm_dim: int = 128
    lm_heads: int = 4
    lm_embedding: str = "final"  # gpt2_lm token embedding: final (hidden state) | last_block_input
    top_m: int = 32  # gpt2_lm sparse residual codec: base-model probabilities kept per memory token
    prob_floor: float = 1e-3  # gpt2_lm: corrected probabilities are clipped below at prob_floor * p(v)


@dataclass
class EmbedConfig:
    batch_size: int = resource(256)
    num_actors: int = resource(2)  # Ray Data actor pool size: one model replica per actor
    cpus_per_actor: float = resource(0.5)
    gpus_per_actor: float = resource(0.0)


@dataclass
class IndexConfig:
    num_shards: int = 2
    factory: str = "Flat"  # FAISS factory string: Flat, IVF1024,Flat, IVF1024,PQ16, HNSW32, ...
    train_sample: int = 100_000  # rows sampled per shard to train IVF / PQ indices
    nprobe: int = 16  # IVF: inverted lists visited per query
    ef_search: int = 64  # HNSW: breadth of the search
    backend: str = "faiss"  # faiss | torch (exact: matrix multiply + top-k, GPU when present)
    #                         | torch_lowp (exact too: a bfloat16 scan, its candidates re-ranked in float32)
    use_gpu: bool = resource(False)  # shard actors ask Ray for a GPU; CPU fallback (logged) without one
    replicas: int = resource(1)  # actors per shard; query batches are balanced across them
    cpus_per_shard: float = resource(0.5)  # CPU share of each shard actor (also its FAISS threads)
    shards_per_actor: int = resource(1)  # shards one actor holds: more shards than cores want several each
    placement_timeout_s: float = resource(120.0)  # fail when shard actors cannot all start in this time
    residual_dtype: str = "float32"  # float16 halves the memory's residual rows (ImageNet: 2.6 GB)


@dataclass
class ResMemConfig:
    k: int = 20  # neighbours whose residuals are summed
    sigma: float = 0.5  # kernel temperature: weights = softmax(-d / sigma)
    temperature: float = 1.0  # T in p = softmax(logits / T), used for residuals and prediction
    gate: float = 1.0  # lambda: weight of the memory's correction
    gate_threshold: float = 1.0  # confidence gate: correct only where max p(x) < this (1.0: always)
    gate_softness: float = 0.0  # 0: hard threshold; > 0: sigmoid((threshold - max p) / softness)
    distance: str = "l2"  # l2 | sqeuclidean | cosine
    normalize: bool = True  # L2-normalise embeddings before indexing and search
    # baseline from the same k neighbours: (1 - knn_lambda) p + knn_lambda p_kNN, p_kNN the
    # neighbours' labels weighted by softmax(-d / knn_tau) (kNN interpolation; kNN-LM for gpt2_lm)
    knn_lambda: float = 0.25  # in [0, 1]
    knn_tau: float = 0.1


@dataclass
class TuneConfig:
    """The search space of `resmem tune` (scored on the validation split)."""

    search: str = "grid"  # grid: every combination | random, optuna: num_samples draws from the ranges
    num_samples: int = 100  # random and optuna only
    k: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 30, 50])
    sigma: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])
    temperature: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    gate: list[float] = field(default_factory=lambda: [0.5, 1.0])
    gate_threshold: list[float] = field(default_factory=lambda: [1.0])  # e.g. [0.8, 0.9, 1.0]
    gate_softness: list[float] = field(default_factory=lambda: [0.0])  # e.g. [0.0, 0.05]
    distance: list[str] = field(default_factory=lambda: ["l2"])  # each distance x normalize pair
    normalize: list[bool] = field(default_factory=lambda: [True])  # is one index build + val search
    learned_gate: bool = True  # fit a logistic gate on val at the best setting (a report row)
    # the kNN interpolation baseline, tuned on val too: a grid at the best k and T, same neighbours
    knn_lambda: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 1.0])
    knn_tau: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])
    cpus_per_trial: float = resource(0.25)
    evaluate: bool = True  # then rebuild the index at the best setting and evaluate once on test


@dataclass
class NeighbourTransformerConfig:
    """The memorization study's Transformer over a query and its k nearest neighbours."""

    enabled: bool = False  # train it (after index) and report it beside k-NN and ResMem
    k: int = 10
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    epochs: int = 20
    batch_size: int = 128  # per worker
    lr: float = 1e-3
    num_workers: int = 1  # Ray Train workers
    cpus_per_worker: float = resource(1.0)


@dataclass
class SweepConfig:
    """`resmem sweep`: the whole pipeline per base-model setting, ASHA over epochs."""

    width: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    lr: list[float] = field(default_factory=list)  # empty: train.lr
    seeds: list[int] = field(default_factory=list)  # empty: seed; each seed is a trial per width and lr
    rungs: list[int] = field(default_factory=lambda: [3, 10])  # epochs at which ASHA may stop a trial
    reduction_factor: int = 2
    tune_resmem: bool = True  # per trial, ResMem's setting is the best of the tune.* grid on val
    max_concurrent: int = resource(2)  # trials at once; each trial's stages ask Ray for their own CPUs
    cpus_per_trial: float = resource(0.1)  # the trial process only drives the stages


@dataclass
class EvaluateConfig:
    knn_ks: list[int] = field(default_factory=lambda: [1, 10, 20, 30])
    batch_size: int = resource(1024)  # queries per lookup round trip


@dataclass
class ServeConfig:
    """`resmem serve`: the Ray Serve application over a finished run (no stage's outputs
    follow from these keys)."""

    host: str = resource("127.0.0.1")  # where the HTTP proxy listens; 0.0.0.0 exposes it to the network
    port: int = resource(8000)
    replicas: int = resource(1)  # model replicas (each embeds and scores batches)
    cpus: float = resource(0.25)  # per model replica
    gpus: float = resource(0.0)  # per model replica
    max_batch_size: int = resource(32)  # requests a model replica embeds together (serve.batch)
    batch_wait_timeout_s: float = resource(0.005)  # how long a replica waits to fill a batch
    token: Optional[str] = resource(None)  # the bearer token of POST /memorize (prefer token_file:
    #                                        a config is recorded in the run's manifest by other stages)
    token_file: Optional[str] = resource(None)  # a file holding the token (its first line)
    open_memorize: bool = resource(False)  # true: POST /memorize without a token (trusted networks only)
    max_request_bytes: int = resource(8 * 2**20)  # larger request bodies get 413
    max_examples: int = resource(256)  # examples per request; more get 413
    # Ray Serve's throughput-optimised mode: each ingress replica also answers HTTP on its
    # own port (from 30000, RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT), skipping the proxy's hop;
    # read when Ray starts, so a cluster sets RAY_SERVE_THROUGHPUT_OPTIMIZED=1 itself
    direct_ingress: bool = resource(True)
    shard_actors: bool = resource(False)  # true: shard actors (index.*) search the memory, not the memory replica


@dataclass
class Config:
    run_dir: str = "runs/digits"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    resmem: ResMemConfig = field(default_factory=ResMemConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    neighbour_transformer: NeighbourTransformerConfig = field(default_factory=NeighbourTransformerConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    text: TextConfig = field(default_factory=TextConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def get_key(cfg: Config, key: str):
    """The value of a dotted key, e.g. get_key(cfg, "resmem.sigma")."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def leaf_keys(cls=Config, prefix: str = "") -> list[tuple[str, bool]]:
    """Every leaf key of the schema as (dotted key, is a resource key), in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        tp = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out += leaf_keys(tp, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, bool(f.metadata.get("resource"))))
    return out

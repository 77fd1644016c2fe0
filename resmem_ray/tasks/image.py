"""Image classification: vision sources (image_data.py), CNNs and ResNets
(vision_models.py), SGD with a cosine schedule, embeddings from the pooled penultimate
layer. Each Ray Train worker loads the dataset itself (shared storage on a cluster) and
takes its shard through a DistributedSampler.

A model trained elsewhere (model.source=checkpoint) is a state dict file: in the suite's
own layout for its models (a run's RUN/model/model.pt), in torchvision's for resnet18/50
and for model.name=torchvision (any torchvision.models classifier, model.arch), in
timm's for model.name=timm (any timm architecture, model.arch); or a
Hugging Face image classifier folder (model.name=hf_image), fed through its own image
processor."""

from __future__ import annotations


import numpy as np
import pyarrow as pa
import torch
from torch.nn import functional as F

from resmem_ray.errors import ConfigError, ResMemError
from resmem_ray.runtime.embedding import map_with_model
from resmem_ray.runtime.trainer import Recipe, worker_loader
from resmem_ray.schema import Config, ModelConfig, PreprocessConfig
from resmem_ray.store.artifacts import read_model_meta
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.classification import ClassificationTask
from resmem_ray.tasks.image_data import (NORMALIZATION, SOURCES, SplitDataset, augment_batch, decode_images,
                                         load_splits, normalize, prepare, request_image)
from resmem_ray.tasks.registry import register
from resmem_ray.tasks.splits import Split
from resmem_ray.tasks.vision_models import (build_model, check_fits, hf_image_classifier, hooked,
                                            published_transforms, read_state_dict, torchvision_net, torchvision_resnet)

WEIGHTS_PRESET = ("torchvision", "resnet18", "resnet50")  # the models preprocess.preset=weights applies to
BY_ARCH = ("torchvision", "timm")  # the libraries whose architecture model.arch names
GIVEN_ONLY = (*BY_ARCH, "hf_image")  # models the suite never trains


def load_model(run: RunDir) -> tuple[torch.nn.Module, dict]:
    """The trained model of a run, checked against the manifest; it gives embed_logits(x)."""
    meta = read_model_meta(run, needed_by="embed")
    cfg = ModelConfig(**meta["model"])
    if cfg.name == "hf_image":
        net, _, name = hf_image_classifier(str(run.model), meta["num_classes"])
        return hooked(net, cfg, torch.zeros(2, *meta["input_shape"]), name), meta
    model = build_model(cfg, meta["in_channels"], meta["num_classes"], meta.get("input_size", meta["image_size"]))
    model.load_state_dict(torch.load(run.model / "model.pt", weights_only=True))
    return model.eval(), meta


def preprocessing(pre: dict, model: dict, dataset: str, channels: int) -> dict:
    """The preprocess.* section `pre` resolved against its preset and checked against the
    data's channels: prepare()'s {resize, crop, mean, std}."""
    if pre.get("preset", "data") == "weights":
        base = published_transforms(model["arch"] if model["name"] == "torchvision" else model["name"])
    else:
        mean, std = NORMALIZATION[dataset]
        base = {"resize": None, "crop": None, "mean": list(mean), "std": list(std)}
    out = {key: pre.get(key) or value for key, value in base.items()}
    for key in ("mean", "std"):
        if len(out[key]) not in (1, channels):
            raise ResMemError(f"config key preprocess.{key}: {len(out[key])} values, data.name={dataset} has "
                              f"{channels} channel(s)" + ("" if pre.get(key) else
                                                          f" (the preset's; set preprocess.{key})"))
    return out


def input_size(pre: dict, image_size: int) -> int:
    """The side of the square images the model is given."""
    return pre["crop"] or pre["resize"] or image_size


def input_transform(pre: dict, processor=None):
    """uint8 (N, C, H, W) images -> the model's input tensor: through a Hugging Face
    model's image processor when its folder has one, else prepare()'d as `pre` says."""
    if processor is None:
        return lambda images: prepare(images, **pre)
    return lambda images: processor(images=list(images), return_tensors="pt",
                                    input_data_format="channels_first")["pixel_values"]


def config_preprocessing(cfg: Config, info) -> dict:
    return preprocessing(cfg.to_dict()["preprocess"], cfg.model.__dict__, cfg.data.name, info.in_channels)


def run_processor(run: RunDir, meta: dict):
    """The image processor saved with a run's Hugging Face model, or None."""
    if meta["model"]["name"] != "hf_image" or not (run.model / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(run.model), local_files_only=True)


class Embedder:
    """A Ray Data actor: one model replica, loaded once; rows (id, label, embedding, logits)."""

    def __init__(self, run_dir: str, num_threads: int):
        torch.set_num_threads(num_threads)
        run = RunDir(run_dir)
        self.model, self.meta = load_model(run)
        # prepared as the embed stage's config says: serve and memorize embed as it did
        embedded = (run.manifest()["stages"].get("embed") or {}).get("config", {})
        pre = preprocessing(embedded.get("preprocess", {}), self.meta["model"], self.meta["dataset"],
                            self.meta["in_channels"])
        self.inputs = input_transform(pre, run_processor(run, self.meta))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            x = self.inputs(batch["image"]).to(self.device)
            z, logits = self.model.embed_logits(x)
        return {"id": batch["id"], "label": batch["label"], "embedding": z.float().cpu().numpy(),
                "logits": logits.float().cpu().numpy()}


def _decode(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    return {"id": batch["id"], "label": batch["label"], "image": decode_images(list(batch["path"]), image_size)}


def split_dataset(split: Split, num_blocks: int):
    """A Ray Dataset of a split's rows (id, label, image or path), in `num_blocks` blocks.
    Images go in as Arrow tensor columns: no per-row Python objects (4x faster to build)."""
    import ray
    from ray.data.extensions import ArrowTensorArray

    blocks = []
    for rows in np.array_split(np.arange(len(split)), num_blocks):
        if not len(rows):
            continue
        columns = {"id": split.ids[rows], "label": split.labels[rows]}
        if split.images is not None:
            columns["image"] = ArrowTensorArray.from_numpy(split.images[rows])
        else:
            columns["path"] = pa.array([split.paths[i] for i in rows])
        blocks.append(pa.table(columns))
    return ray.data.from_arrow(blocks)


def recipe(cfg: Config) -> Recipe:
    """SGD (Nesterov) with a cosine schedule over train.epochs; random crop + flip when
    data.augment. The splits are loaded on each worker."""
    t = cfg.train
    held: dict = {}

    def prepare():
        held["splits"], held["info"] = load_splits(cfg.data, cfg.seed)

    def build():
        info = held["info"]
        model = build_model(cfg.model, info.in_channels, info.num_classes, info.image_size)
        optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                                    nesterov=True)
        return model, optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs)

    def batches(split: str, epoch: int):
        return worker_loader(held, split, epoch, lambda: SplitDataset(held["splits"][split], held["info"].image_size),
                             t.batch_size)

    def step(model, batch, device, training):
        images, labels, _ = batch
        x = normalize(images, cfg.data.name)
        if training and cfg.data.augment:
            x = augment_batch(x)
        x, labels = x.to(device), labels.to(device)
        logits = model(x)
        return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).sum().item(), len(labels)

    return Recipe(stage="train", epochs=t.epochs, seed=cfg.seed, build=build, batches=batches, step=step,
                  prepare=prepare)


PREPROCESS_DEFAULTS = PreprocessConfig().__dict__


def changed_preprocess(cfg: Config) -> list[str]:
    """The preprocess.* keys the config sets away from their defaults."""
    return [f"preprocess.{k}" for k, v in cfg.to_dict()["preprocess"].items() if v != PREPROCESS_DEFAULTS[k]]


def given_hf_image(cfg: Config, splits: dict, info) -> dict:
    """A Hugging Face image classifier folder, run once on two training images as the
    embed stage will run it (its image processor, then the network)."""
    net, processor, name = hf_image_classifier(cfg.model.path, info.num_classes)
    changed = changed_preprocess(cfg)
    if processor is not None and changed:
        raise ConfigError(f"config key {changed[0]}: {name} is fed through its own image processor "
                          "(preprocessor_config.json in its folder), which the preprocess.* keys do not change")
    train = splits["train"]
    images = train.images[:2] if train.images is not None else decode_images(train.paths[:2], info.image_size)
    try:
        probe = input_transform(config_preprocessing(cfg, info), processor)(images)
    except Exception as e:  # the processor's own: a mean of 3 channels for gray images, ...
        raise ResMemError(f"{name}: its image processor does not take the data's "
                          f"{'x'.join(map(str, images.shape[1:]))} images: "
                          f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
    model = hooked(net, cfg.model, probe, name)
    return {"net": net, "processor": processor, "embedding_dim": model.embedding_dim,
            "input_shape": list(probe.shape[1:])}


@register
class ImageClassification(ClassificationTask):
    name = "image"
    datasets = tuple(SOURCES)
    models = ("small_cnn", "resnet20", "resnet32", "resnet56", "resnet18", "resnet50", *GIVEN_ONLY)
    reads = {"train": ("preprocess.preset", "preprocess.resize", "preprocess.crop"),  # a given model's input size
             "embed": ("preprocess.mean", "preprocess.std"),
             "index": ("resmem.temperature",)}  # the dense residuals' T

    def check_config(self, cfg: Config) -> None:
        if cfg.data.name == "imagefolder" and not cfg.data.root:
            raise ConfigError("config key data.root is required for data.name=imagefolder")
        m = cfg.model
        if m.name in BY_ARCH and not m.arch:
            raise ConfigError(f"config key model.arch is required for model.name={m.name} (a {m.name} architecture: "
                              + ("resnet18, mobilenet_v3_small, efficientnet_b0, ...)" if m.name == "torchvision"
                                 else "resnet10t, convnext_atto, ...: timm.list_models())"))
        if m.name in GIVEN_ONLY and m.source != "checkpoint":
            raise ConfigError(f"config key model.name={m.name} takes a model trained elsewhere: set "
                              "model.source=checkpoint and model.path (the suite trains small_cnn, resnet20/32/56, "
                              "resnet18/50)")
        changed = changed_preprocess(cfg)
        if changed and m.source == "trained":
            raise ConfigError(f"config key {changed[0]} applies to a given model (model.source=checkpoint): the "
                              "suite's own models are fed as they are trained")
        if cfg.preprocess.preset == "weights" and m.name not in WEIGHTS_PRESET:
            raise ConfigError(f"config key preprocess.preset=weights applies to {', '.join(WEIGHTS_PRESET)} "
                              f"(torchvision's published weights), not model.name={m.name}")
        if m.name not in BY_ARCH and m.arch is not None:
            raise ConfigError(f"config key model.arch applies to model.name=torchvision and timm only "
                              f"(model.name={m.name})")
        if m.name not in GIVEN_ONLY and m.embedding_layer is not None:
            raise ConfigError(f"config key model.embedding_layer applies to model.name=torchvision only "
                              f"(and timm, hf_image; model.name={m.name} embeds at its classifier's input)")

    def load_splits(self, cfg: Config):
        return load_splits(cfg.data, cfg.seed)

    def training(self, cfg: Config, run: RunDir, splits: dict, info):
        return recipe(cfg), None

    def save_model(self, cfg: Config, run: RunDir, folder, state: dict, splits: dict, info) -> dict:
        torch.save(state["model"], folder / "model.pt")
        size = input_size(config_preprocessing(cfg, info), info.image_size)
        probe = build_model(cfg.model, info.in_channels, info.num_classes, size)
        return {"model": cfg.model.__dict__, "dataset": cfg.data.name, "num_classes": info.num_classes,
                "in_channels": info.in_channels, "image_size": info.image_size, "input_size": size,
                "embedding_dim": probe.embedding_dim}

    def load_given(self, cfg: Config, splits: dict, info):
        """A state dict checked against the architecture and the data, in the suite's layout
        (resnet18/50: torchvision's layout, or the suite's own: a run's model.pt)."""
        if cfg.model.source != "checkpoint":
            return super().load_given(cfg, splits, info)
        m, path = cfg.model, cfg.model.path
        size = input_size(config_preprocessing(cfg, info), info.image_size)  # preprocess.* checked here too
        if m.name == "hf_image":
            return given_hf_image(cfg, splits, info)
        state = read_state_dict(path)
        data = f"data.name={cfg.data.name}"
        if m.name in ("resnet18", "resnet50") and "head.weight" not in state:  # torchvision's layout, into the suite's
            net = torchvision_net(m.name, info.in_channels, info.num_classes)
            check_fits(state, net, path, f"torchvision's {m.name}", data, info.num_classes, info.in_channels)
            net.load_state_dict(state)
            return {"model": torchvision_resnet(m.name, info.in_channels, info.num_classes, net).state_dict()}
        model = build_model(m, info.in_channels, info.num_classes, size)
        net = model.net if m.name in BY_ARCH else model
        what = f"{m.name}'s {m.arch}" if m.name in BY_ARCH else f"model.name={m.name}" + (
            "" if m.name in ("resnet18", "resnet50") else f" (width {m.width})")
        check_fits(state, net, path, what, data, info.num_classes, info.in_channels)
        net.load_state_dict(state)
        return {"model": model.state_dict()}

    def save_given(self, cfg: Config, run: RunDir, folder, given, splits: dict, info) -> dict:
        if cfg.model.name != "hf_image":
            return super().save_given(cfg, run, folder, given, splits, info)
        given["net"].save_pretrained(folder)
        if given["processor"] is not None:
            given["processor"].save_pretrained(folder)
        return {"model": cfg.model.__dict__, "dataset": cfg.data.name, "num_classes": info.num_classes,
                "in_channels": info.in_channels, "image_size": info.image_size,
                "embedding_dim": given["embedding_dim"], "input_shape": given["input_shape"]}

    def embed_rows(self, cfg: Config, run: RunDir, split: Split, split_name: str, meta: dict):
        preprocessing(cfg.to_dict()["preprocess"], meta["model"], meta["dataset"], meta["in_channels"])  # checked here
        e = cfg.embed
        ds = split_dataset(split, num_blocks=max(4 * e.num_actors, len(split) // (4 * e.batch_size)))
        if split.images is None:  # decoding as its own CPU step, overlapping inference
            ds = ds.map_batches(_decode, fn_kwargs={"image_size": meta["image_size"]},
                                batch_size=e.batch_size, num_cpus=min(1.0, e.cpus_per_actor))
        return map_with_model(ds, Embedder, {"run_dir": run.location}, e)

    def model_title(self, cfg: Config) -> str:
        m = cfg.model
        if m.source == "trained":
            return f"{m.name} (width {m.width})"
        return f"{m.arch if m.name in BY_ARCH else m.name} from {m.path}"

    def read_examples(self, path: str, meta: dict) -> Split:
        """An .npz with images (uint8, N x C x H x W, the model's input size) and labels (N,)."""
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):  # numpy's own message suggests allow_pickle: never
            raise ResMemError(f"{path}: not a readable .npz file (write one with numpy.savez(path, images=..., "
                              "labels=...))") from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ResMemError(f"{path}: a single array, not an .npz archive (write one with numpy.savez(path, "
                              "images=..., labels=...))")
        with z:
            missing = {"images", "labels"} - set(z.files)
            if missing:
                raise ResMemError(f"{path}: missing array(s) {', '.join(sorted(missing))} "
                                  "(need images (N, C, H, W) uint8 and labels (N,))")
            try:
                images, labels = z["images"], z["labels"]
            except ValueError:  # object arrays: a pickle inside the archive
                raise ResMemError(f"{path}: images or labels hold Python objects, which are never loaded: "
                                  "store plain numeric arrays") from None
        c, s = meta["in_channels"], meta["image_size"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (c, s, s):
            raise ResMemError(f"{path}: images are {images.dtype} {images.shape}, the model takes uint8 "
                              f"(N, {c}, {s}, {s})")
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ResMemError(f"{path}: labels must be {len(images)} integers, got {labels.dtype} {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= meta["num_classes"]):
            raise ResMemError(f"{path}: labels must lie in [0, {meta['num_classes']}), "
                              f"got {labels.min()}..{labels.max()}")
        if not len(labels):
            raise ResMemError(f"{path}: holds no examples")
        return Split(ids=np.zeros(len(labels), np.int64), labels=labels.astype(np.int64), images=images)

    def serve_inputs(self, items: list, meta: dict) -> list[np.ndarray]:
        return [request_image(item, i, meta["in_channels"], meta["image_size"]) for i, item in enumerate(items)]

    def serve_encoder(self, run_dir: str, num_threads: int):
        embedder = Embedder(run_dir, num_threads)

        def encode(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            zeros = np.zeros(len(images), np.int64)
            rows = embedder({"id": zeros, "label": zeros, "image": np.stack(images)})
            return rows["embedding"], rows["logits"]

        return encode

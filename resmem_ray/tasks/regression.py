"""Regression: ResMem for any predictor, the residual being y - f(x) (the paper's theory
is a stylized linear regression). The fourth task, added as this one module.

  data.name  diabetes     scikit-learn's bundled diabetes data (442 patients, 10 features)
             linear_sim   a simulation: x ~ N(0, I_8), y = x.beta + sin(3 x_0) + N(0, 0.1^2);
                          a linear base model cannot fit the sine, the memory can
  model.name linear       y = w.x + b; its embedding is the (standardised) input itself
             mlp          two hidden layers of model.width units; embedding: the last one

Features and targets are standardised with the train split's mean and std (kept in
meta.json); the model trains on MSE with AdamW (train.lr, train.weight_decay). Each
memory row holds the scalar residual y_i - f(x_i), and a query's prediction is

    resmem(x) = f(x) + gate * sum_i w_i(x) (y_i - f(x_i)),   w = softmax(-d / sigma)

The report compares the RMSE of the base model, k-NN regression (the mean target of
the k nearest training examples) and ResMem. `resmem tune` chooses k, sigma, the gate and
the memory's distance by val RMSE.
"""

from __future__ import annotations


import numpy as np
import pyarrow as pa
import torch
from torch import nn

from resmem_ray.core.resmem import apply_correction, memory_correction
from resmem_ray.runtime.embedding import map_with_model
from resmem_ray.runtime.trainer import Recipe, worker_loader
from resmem_ray.schema import Config
from resmem_ray.store.artifacts import TableWriter, footprint_line, read_model_meta
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.methods import ordered, title, tuning_lines
from resmem_ray.tasks.registry import Scorer, Task, register
from resmem_ray.tasks.splits import DatasetInfo, Split, make_splits
from resmem_ray.tasks.vision_models import EmbedHead

SIM_ROWS, SIM_DIM = 3000, 8


def diabetes():
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    return d.data.astype(np.float32), d.target.astype(np.float64), None, None


def linear_sim():
    rng = np.random.default_rng(1234)  # the data set is fixed; `seed` varies the splits and training
    x = rng.standard_normal((SIM_ROWS, SIM_DIM)).astype(np.float32)
    beta = rng.standard_normal(SIM_DIM)
    y = x @ beta + np.sin(3 * x[:, 0]) + 0.1 * rng.standard_normal(SIM_ROWS)
    return x, y.astype(np.float64), None, None


SOURCES = {"diabetes": diabetes, "linear_sim": linear_sim}


def build_regressor(name: str, dim: int, width: int) -> EmbedHead:
    if name == "linear":
        return EmbedHead(nn.Identity(), dim, 1)
    features = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
    return EmbedHead(features, width, 1)


def standardise(split: Split, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    x = (split.features - np.array(meta["x_mean"])) / np.array(meta["x_std"])
    return x.astype(np.float32), ((split.labels - meta["y_mean"]) / meta["y_std"]).astype(np.float32)


def scaling(train: Split) -> dict:
    return {"x_mean": train.features.mean(0).tolist(), "x_std": (train.features.std(0) + 1e-8).tolist(),
            "y_mean": float(train.labels.mean()), "y_std": float(train.labels.std() + 1e-8)}


def recipe(cfg: Config, splits: dict, info: DatasetInfo) -> Recipe:
    t = cfg.train
    scale = scaling(splits["train"])
    data = {s: standardise(splits[s], scale) for s in ("train", "val")}
    held: dict = {}

    def build():
        model = build_regressor(cfg.model.name, info.in_channels, cfg.model.width)
        return model, torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay), None

    def batches(split: str, epoch: int):
        return worker_loader(held, split, epoch,
                             lambda: torch.utils.data.TensorDataset(*(torch.from_numpy(a) for a in data[split])),
                             t.batch_size)

    def step(model, batch, device, training):
        x, y = (b.to(device) for b in batch)
        err = model(x)[:, 0] - y
        return (err ** 2).mean(), (err ** 2).sum().item(), len(y)

    return Recipe(stage="train", epochs=t.epochs, seed=cfg.seed, build=build, batches=batches, step=step, score="mse")


def load_regressor(run: RunDir) -> tuple[EmbedHead, dict]:
    meta = read_model_meta(run, needed_by="embed")
    model = build_regressor(meta["model"]["name"], meta["in_features"], meta["model"]["width"])
    model.load_state_dict(torch.load(run.model / "model.pt", weights_only=True))
    return model.eval(), meta


class Regressor:
    """A Ray Data actor: rows (id, label, embedding, prediction), the prediction in the
    target's own units."""

    def __init__(self, run_dir: str, num_threads: int):
        torch.set_num_threads(num_threads)
        self.model, self.meta = load_regressor(RunDir(run_dir))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = (batch["features"] - np.array(self.meta["x_mean"])) / np.array(self.meta["x_std"])
        with torch.inference_mode():
            z = self.model.embed(torch.as_tensor(x, dtype=torch.float32))
            pred = self.model.head(z)[:, 0].double().numpy() * self.meta["y_std"] + self.meta["y_mean"]
        return {"id": batch["id"], "label": batch["label"], "embedding": z.float().numpy(), "prediction": pred}


def rmse(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred - y) ** 2)))


def resmem_regression(cfg: Config, prediction: np.ndarray, nb) -> np.ndarray:
    """f(x) + gate * sum_i w_i (y_i - f(x_i)) over the resmem.k nearest of `nb`."""
    r = cfg.resmem
    near = nb.first(r.k)
    correction = memory_correction(near.residuals, near.distances, r.sigma)
    return apply_correction(prediction[:, None], correction, r.gate)[:, 0]


@register
class Regression(Task):
    name = "regression"
    datasets = tuple(SOURCES)
    models = ("linear", "mlp")
    codec = "scalar"
    query_columns = memory_columns = ("id", "label", "embedding", "prediction")

    def load_splits(self, cfg: Config):
        parts = SOURCES[cfg.data.name]()
        splits, _ = make_splits(parts, cfg.data, cfg.seed, "features")
        return splits, DatasetInfo(cfg.data.name, 1, parts[0].shape[1], 0)

    def training(self, cfg: Config, run: RunDir, splits: dict, info):
        return recipe(cfg, splits, info), None

    def save_model(self, cfg: Config, run: RunDir, folder, state: dict, splits: dict, info) -> dict:
        torch.save(state["model"], folder / "model.pt")
        dim = info.in_channels if cfg.model.name == "linear" else cfg.model.width
        return {"model": cfg.model.__dict__, "dataset": cfg.data.name, "num_classes": 1, "in_features": info.in_channels,
                "embedding_dim": dim, **scaling(splits["train"])}

    def embed_rows(self, cfg: Config, run: RunDir, split: Split, split_name: str, meta: dict):
        import ray.data
        from ray.data.extensions import ArrowTensorArray

        ds = ray.data.from_arrow(pa.table({"id": split.ids, "label": split.labels,
                                           "features": ArrowTensorArray.from_numpy(split.features)}))
        return map_with_model(ds, Regressor, {"run_dir": run.location}, cfg.embed)

    def memory_rows(self, cfg: Config, rows: dict, temperature: float, embedded: dict) -> dict:
        return {"residuals": (rows["label"] - rows["prediction"])[:, None].astype(np.float32), "manifest": {}}

    def lookup_k(self, cfg: Config) -> int:
        return max([cfg.resmem.k, *cfg.evaluate.knn_ks])

    tune_keys = ("k", "sigma", "gate", "distance", "normalize")
    scores = ("val_rmse",)
    mode = "min"

    def val_scores(self, cfg: Config, table: dict, methods: tuple[str, ...]) -> dict[str, dict[str, float]]:
        val = table["val"]
        return {m: {"val_rmse": rmse(val["prediction"] if m == "base" else
                                     resmem_regression(cfg, val["prediction"], table["neighbours"]), val["label"])}
                for m in methods}

    def scorer(self, cfg: Config, run: RunDir, manifest: dict, folder, tuning: dict | None = None) -> Scorer:
        return RegressionScorer(cfg, manifest, folder, tuning, self.name)

    def done_info(self, metrics: dict) -> dict:
        return {"rmse": metrics["rmse"]}


class RegressionScorer(Scorer):
    """Every method's test RMSE as running sums of squared errors, chunk by chunk;
    predictions.parquet gets a row group per chunk."""

    def __init__(self, cfg: Config, manifest: dict, folder, tuning: dict | None, task: str):
        self.cfg, self.manifest, self.folder, self.tuning, self.task = cfg, manifest, folder, tuning, task
        self.predictions = TableWriter(folder / "predictions.parquet")
        self.squared, self.n, self.y_sum, self.y_squared = {}, 0, 0.0, 0.0

    def add(self, rows: dict, queries, nb, reads) -> None:
        y = rows["label"].astype(np.float64)
        preds = {"base": rows["prediction"]}
        for k in self.cfg.evaluate.knn_ks:
            preds[f"knn_{k}"] = nb.labels[:, :k].astype(np.float64).mean(1)
        preds["resmem"] = resmem_regression(self.cfg, rows["prediction"], nb)
        for m in ordered(preds):
            self.squared[m] = self.squared.get(m, 0.0) + float(((preds[m] - y) ** 2).sum())
        self.n, self.y_sum, self.y_squared = self.n + len(y), self.y_sum + y.sum(), self.y_squared + (y * y).sum()
        self.predictions.write(pa.table({"id": rows["id"], "label": rows["label"], **preds}))

    def finish(self) -> dict:
        self.predictions.close()
        cfg, r, m, n = self.cfg, self.cfg.resmem, self.manifest, self.n
        std = float(np.sqrt(max(self.y_squared / n - (self.y_sum / n) ** 2, 0.0)))
        metrics = {"task": "regression", "rmse": {k: float(np.sqrt(v / n)) for k, v in self.squared.items()},
                   "num_test": n, "memory_rows": m["rows"], "num_shards": len(m["shards"]),
                   "target_std": std, "resmem": r.__dict__, "tuning": self.tuning}
        lines = [f"# ResMem report: {cfg.data.name}, {cfg.model.name} regression"
                 + (f" (width {cfg.model.width})" if cfg.model.name == "mlp" else ""), "",
                 f"Test split: {n} examples (target std {std:.4g}); memory: {m['rows']} training "
                 f"examples in {len(m['shards'])} shard(s), {footprint_line(m)}.",
                 f"ResMem: k={r.k}, sigma={r.sigma}, gate={r.gate}, distance={r.distance}, normalize={r.normalize}.",
                 "", "| method | test RMSE |", "| --- | ---: |"]
        lines += [f"| {title(k, self.task)} | {v:.4f} |" for k, v in metrics["rmse"].items()]
        if self.tuning:
            lines += tuning_lines(self.tuning, self.task)
        (self.folder / "report.md").write_text("\n".join(lines) + "\n")
        return metrics

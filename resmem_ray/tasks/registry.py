"""Tasks as plugins: what ResMem is applied to (image classification, text
classification, a token-level language model, regression), each one module behind the
small interface of `Task`, registered by name the way timm registers models.

A task owns its data, its models and how they train, embed and are scored; the stages
(stages/) own the order of work and the run directory, and ask `task_for(cfg)` for the
task that `model.name` picks. A task also declares which config keys each stage's
outputs follow from through it (`reads`), so resumption knows what a change makes stale.

A new task is one module that subclasses Task and is decorated with `@register`, plus
its import in tasks/__init__.py (or an entry point in the group `resmem_ray.tasks`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from resmem_ray.errors import ConfigError, ResMemError
from resmem_ray.tasks.methods import baseline_k

if TYPE_CHECKING:
    from resmem_ray.schema import Config
    from resmem_ray.store.rundir import RunDir

_TASKS: dict[str, "Task"] = {}


class Scorer:
    """A task's scoring of the test split, one chunk at a time (stages/evaluate.py): `add`
    takes a chunk's rows, its prepared queries, the neighbours of the rows that read the
    memory (`reads`: their mask, None: all) and keeps running metrics (and at most a few
    numbers per row); `finish` writes the report and returns the metrics."""

    def add(self, rows: dict, queries, nb, reads) -> None:
        raise NotImplementedError

    def finish(self) -> dict:
        raise NotImplementedError


class Task:
    """One kind of problem. Subclasses set the names and override what they support."""

    name: str = ""
    datasets: tuple[str, ...] = ()  # data.name values it reads
    models: tuple[str, ...] = ()  # model.name values it builds (model.name picks the task)
    # per stage, the config keys (sections or leaves) its outputs follow from through this task
    reads: dict[str, tuple[str, ...]] = {}
    codec: str = "dense"  # residual rows in the memory: dense (C floats) | sparse (top-m) | scalar
    one_row_per_example: bool = True  # embed writes one row per example (False: per token)
    query_columns: tuple[str, ...] = ("id", "label", "embedding", "logits")
    memory_columns: tuple[str, ...] = ("id", "label", "embedding", "logits")

    # --- config and data --------------------------------------------------------------
    def stage_reads(self, cfg: "Config") -> dict[str, tuple[str, ...]]:
        """`reads` for this config (a given model does not read the keys that build one)."""
        return self.reads

    def check_config(self, cfg: "Config") -> None:
        """Raise ConfigError naming the key for settings this task cannot run."""

    def load_splits(self, cfg: "Config") -> tuple[dict, Any]:
        """({"train", "val", "test"} -> Split, DatasetInfo)."""
        raise NotImplementedError

    # --- train ------------------------------------------------------------------------
    def training(self, cfg: "Config", run: "RunDir", splits: dict, info) -> tuple[Any, dict | None]:
        """(runtime.trainer.Recipe, Ray datasets for the trainer or None)."""
        raise NotImplementedError

    def save_model(self, cfg: "Config", run: "RunDir", folder, state: dict, splits: dict, info) -> dict:
        """Write the trained model into `folder`; return its meta.json content (with
        num_classes and embedding_dim)."""
        raise NotImplementedError

    # --- a given model (model.source=checkpoint) -----------------------------------------
    def load_given(self, cfg: "Config", splits: dict, info) -> Any:
        """The model at model.path, loaded and checked against the data (a ResMemError
        naming the file, key, layer or shape that does not fit); what save_given writes."""
        raise ConfigError(f"config key model.source=checkpoint: the {self.name} task (model.name={cfg.model.name}) "
                          "takes no checkpoint")

    def save_given(self, cfg: "Config", run: "RunDir", folder, given, splits: dict, info) -> dict:
        """Write the given model into `folder` as a trained one is written; meta.json's content."""
        return self.save_model(cfg, run, folder, given, splits, info)

    # --- embed ------------------------------------------------------------------------
    def embed_rows(self, cfg: "Config", run: "RunDir", split, split_name: str, meta: dict):
        """A Ray Dataset of the split's rows (id, label, embedding and what later stages read)."""
        raise NotImplementedError

    def embed_info(self, cfg: "Config", splits: dict, meta: dict) -> dict:
        """What the embed stage records in the manifest (max_id: the largest example id)."""
        return {"max_id": max(int(s.ids.max()) for s in splits.values())}

    # --- index ------------------------------------------------------------------------
    def memory_rows(self, cfg: "Config", rows: dict, temperature: float, embedded: dict) -> dict:
        """The memory's rows from embedding rows, row by row (`resmem index` calls it on
        each shard's rows in that shard's task): {"residuals", "residual_ids" (sparse codec
        only), "manifest" (extra index manifest fields, the same for any rows)}."""
        raise NotImplementedError

    def memory_info(self, cfg: "Config", manifest: dict) -> dict:
        """What `resmem index` records of the built memory (its index manifest) in the run
        manifest, and "lines" for the log."""
        return {}

    # --- evaluate ---------------------------------------------------------------------
    def lookup_k(self, cfg: "Config") -> int:
        """How many neighbours evaluate asks the memory for (ResMem's and kNN interpolation's)."""
        return max(cfg.resmem.k, baseline_k(cfg.resmem))

    def memory_reads(self, cfg: "Config", test: dict):
        """A mask of the test rows (of one chunk) that read the memory (the others are never
        searched); None: every row."""
        return None

    def scorer(self, cfg: "Config", run: "RunDir", manifest: dict, folder, tuning: dict | None = None) -> "Scorer":
        """What scores every method (tasks/methods.py) on the test split as it streams
        through evaluate, writing report.md (and plots, predictions) into `folder`. `tuning`:
        `resmem tune`'s summary when the config evaluates its chosen setting."""
        raise NotImplementedError

    def method_accuracies(self, cfg: "Config", table: dict, tuning: dict | None) -> dict[str, float]:
        """Every method's accuracy on the val rows of a neighbour table (`resmem sweep`)."""
        raise ResMemError(f"the {self.name} task has no per-method accuracies (model.name={cfg.model.name})")

    # --- tune -------------------------------------------------------------------------
    # the resmem keys `resmem tune` searches, each over tune.<key> (distance and normalize:
    # one index and one val search per pair); none: the task is not tuned
    tune_keys: tuple[str, ...] = ()
    scores: tuple[str, ...] = ("val_accuracy",)  # what a trial reports; the first is the objective
    mode: str = "max"  # which end of the objective is best: max | min

    def tune_table(self, cfg: "Config", run: "RunDir", val: dict, nb) -> dict:
        """What every trial reads besides the val rows and their neighbours (a neighbour table's extras)."""
        return {}

    def val_scores(self, cfg: "Config", table: dict, methods: tuple[str, ...]) -> dict[str, dict[str, float]]:
        """{method: {score: value}} of these methods (base, resmem, a tuned baseline) on the
        val rows of a neighbour table, at cfg's resmem setting."""
        raise ResMemError(f"the {self.name} task (model.name={cfg.model.name}) is not tuned by `resmem tune`")

    def tuned_baselines(self) -> list:
        """The baselines whose settings `resmem tune` chooses on val (tasks/methods.py)."""
        return []

    def fit_on_val(self, cfg: "Config", table: dict) -> dict:
        """What the task fits on val at cfg's (the chosen) setting, for the tune summary (a learned gate)."""
        return {}

    def done_info(self, metrics: dict) -> dict:
        """What evaluate records in the manifest."""
        return {"accuracy": metrics["accuracy"]}

    # --- memorize ---------------------------------------------------------------------
    def read_examples(self, path: str, meta: dict):
        """New labelled examples for `resmem memorize`, as a Split."""
        raise ResMemError(f"resmem memorize cannot add examples to a {self.name} run (model.name={self.models[0]})")


    # --- serve ----------------------------------------------------------------------------
    def serve_inputs(self, items: list, meta: dict) -> list:
        """Request examples (JSON values, or one raw image's bytes) as model inputs, one per
        example; a ResMemError naming the first bad one."""
        raise ResMemError(f"the {self.name} task (model.name={self.models[0]}) is not served by `resmem serve`: "
                          "it serves image and text classification runs")

    def serve_labels(self, labels, count: int, meta: dict):
        """The labels of POST /memorize as an int64 array, checked against the run's classes."""
        raise ResMemError(f"the {self.name} task is not served by `resmem serve`")

    def serve_encoder(self, run_dir: str, num_threads: int):
        """A callable: a list of model inputs (serve_inputs') -> (embeddings, logits)."""
        raise ResMemError(f"the {self.name} task is not served by `resmem serve`")

    def serve_answers(self, cfg: "Config", logits, nb) -> list[dict]:
        """Per example: base and ResMem class and probabilities, the gate, the neighbours."""
        raise ResMemError(f"the {self.name} task is not served by `resmem serve`")


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available by its name and its models' names."""
    task = cls()
    for other in _TASKS.values():
        clash = set(task.models) & set(other.models)
        if clash:
            raise ValueError(f"task {task.name}: model name(s) {sorted(clash)} already belong to {other.name}")
    _TASKS[task.name] = task
    return cls


def task_for(cfg: "Config") -> Task:
    """The task that cfg.model.name picks, after checking that data.name fits it. With
    model.source=precomputed the files at model.path are the model and the data both:
    the precomputed task, whatever model.name says (data.name only names the data)."""
    _discover()
    if cfg.model.source == "precomputed":
        return _TASKS["precomputed"]
    by_model = {m: t for t in _TASKS.values() for m in t.models}
    by_data = {d: t for t in _TASKS.values() for d in t.datasets}
    if cfg.data.name not in by_data:
        raise ConfigError(f"config key data.name: unknown value {cfg.data.name!r} (choose from {', '.join(by_data)})")
    if cfg.model.name not in by_model:
        raise ConfigError(f"config key model.name: unknown value {cfg.model.name!r} "
                          f"(choose from {', '.join(by_model)})")
    task = by_model[cfg.model.name]
    if cfg.data.name not in task.datasets:
        raise ConfigError(f"config key model.name={cfg.model.name!r} does not fit data.name={cfg.data.name!r}: "
                          f"the {task.name} task reads {', '.join(task.datasets)}")
    return task


_DISCOVERED = False


def _discover() -> None:
    """Load installed plugins' tasks, each named by an entry point in the group
    `resmem_ray.tasks` (the built-in ones are imported by tasks/__init__.py)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="resmem_ray.tasks"):
        ep.load()

"""The stage table: every stage of the suite, declared once, in pipeline order.

The CLI's subcommands, `resmem run`'s order and skip logic (pipeline.py), `resmem
submit`'s accepted stages, the job entry point (`python -m jobs STAGE`) and the run
directory's resumption (store/rundir.py) all read it. Adding a stage is one entry here
and its function. A function is named by its module path, as torchtune's recipe
registry names recipes, so this table imports nothing and every layer can read it.

What a stage's outputs depend on is derived: the config keys that name it (declared on
the schema's fields, schema.py), the keys its task declares for it (tasks/registry.py),
and those of every stage it reads that takes part in the run, transitively
(pipeline.stage_keys).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str  # the CLI subcommand, `python -m jobs <name>`, the manifest key
    help: str
    function: str  # "module:function", called as function(cfg, **options)
    folder: str | None = None  # output folder under RUN/ (None: no outputs of its own)
    reads: tuple[str, ...] = ()  # stages whose outputs it reads (a change there makes it stale)
    in_pipeline: bool = False  # part of `resmem run`
    enabled_by: str | None = None  # a boolean config key that turns it on in the pipeline
    options: tuple[tuple[str, str], ...] = ()  # extra required CLI options: (flag, help)

    def run(self, cfg, **options):
        module, name = self.function.split(":")
        return getattr(importlib.import_module(module), name)(cfg, **options)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("train", "train the base model (Ray Train)", "resmem_ray.stages.train:train", folder="model",
          in_pipeline=True),
    Stage("embed", "embeddings and logits of every split (Ray Data)", "resmem_ray.stages.embed:embed",
          folder="embeddings", reads=("train",), in_pipeline=True),
    Stage("index", "build the sharded FAISS memory (Ray tasks)", "resmem_ray.stages.index:build_index",
          folder="index", reads=("embed",), in_pipeline=True),
    Stage("transformer", "train the neighbour Transformer on the train split's neighbours (Ray Train)",
          "resmem_ray.stages.transformer:train_neighbour_transformer", folder="transformer",
          reads=("embed", "index"), in_pipeline=True,
          enabled_by="neighbour_transformer.enabled"),
    Stage("tune", "Ray Tune over k, sigma, T, gate on val; then evaluate the best once on test",
          "resmem_ray.stages.tune:tune_resmem", folder="tune", reads=("embed", "index")),
    Stage("evaluate", "test-split report from sharded lookup actors", "resmem_ray.stages.evaluate:evaluate",
          folder="report", reads=("embed", "index", "transformer", "tune"), in_pipeline=True),
    Stage("memorize", "add labelled examples (--examples FILE) to the memory, no retraining",
          "resmem_ray.stages.memorize:memorize", reads=("train", "embed", "index"),
          options=(("--examples", "the examples: for image runs an .npz with images (N, C, H, W) uint8 and "
                                  "labels (N,); for text classification runs a .jsonl or .csv of text and label"),)),
    Stage("serve", "a Ray Serve application over the run: POST /predict answers from the sharded memory, "
          "POST /memorize adds labelled examples live (serve.*)", "resmem_ray.stages.serve:serve_run",
          reads=("train", "index")),
    Stage("sweep", "Ray Tune + ASHA over the base model (sweep.width, sweep.lr): the pipeline per trial",
          "resmem_ray.stages.sweep:sweep"),
)}

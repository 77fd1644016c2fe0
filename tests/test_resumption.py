"""Which stages a change of each config key makes stale, for every task: a table walked
over every leaf key of the schema, against a run directory whose stages are all done;
and every key of the schema is owned by a stage or left to the tasks."""

import copy
import dataclasses
import glob

import pytest

from resmem_ray.config import load_config
from resmem_ray.pipeline import enabled, stage_keys
from resmem_ray.schema import RULES, leaf_keys
from resmem_ray.stage_table import STAGES
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.registry import task_for

ALL = {s.name for s in STAGES.values() if s.folder}  # the stages with outputs (and a manifest entry)
FROM_EMBED = ALL - {"train"}
FROM_INDEX = FROM_EMBED - {"embed"}
SEARCHING = {"transformer", "tune", "evaluate"}
TEXT_SOURCE = ("text.hf_path", "text.hf_subset", "text.train_split", "text.test_split", "text.text_column",
               "text.label_column", "text.max_length", "text.pretrained")
# the image task's: the sizes fix a given model's input (train), mean and std are embed's
PREPROCESS = {"preprocess.preset": ALL, "preprocess.resize": ALL, "preprocess.crop": ALL,
              "preprocess.mean": FROM_EMBED, "preprocess.std": FROM_EMBED}
LM_MODEL = ("text.tokenizer", "text.vocab_size", "text.lm_layers", "text.lm_dim", "text.lm_heads")

# key (or section) -> stages it makes stale; the most specific entry wins. Keys of no
# entry make nothing stale, and only these may have none: resources (run_dir among
# them), keys of stages without outputs (sweep), keys left to the tasks (other tasks').
COMMON = {
    "seed": ALL, "data": ALL, "model": ALL, "train": ALL,
    "index.num_shards": FROM_INDEX, "index.factory": FROM_INDEX, "index.train_sample": FROM_INDEX,
    "index.residual_dtype": FROM_INDEX, "index.keep_vectors": FROM_INDEX, "index.rerank": SEARCHING,
    "index.nprobe": SEARCHING, "index.ef_search": SEARCHING,
    "index.backend": SEARCHING,
    "resmem.distance": FROM_INDEX, "resmem.normalize": FROM_INDEX,
    "resmem.k": {"evaluate"}, "resmem.sigma": {"evaluate"}, "resmem.gate": {"evaluate"},
    "resmem.gate_threshold": {"evaluate"}, "resmem.gate_softness": {"evaluate"},
    "resmem.knn_k": {"evaluate"}, "resmem.knn_lambda": {"evaluate"}, "resmem.knn_tau": {"evaluate"},
    "tune": {"tune"}, "evaluate.knn_ks": {"evaluate"}, "neighbour_transformer.enabled": {"transformer", "evaluate"},
    "neighbour_transformer": {"transformer", "evaluate"},
    # resources: where and how fast, never what
    "train.use_gpu": set(), "train.cpus_per_worker": set(), "tune.cpus_per_trial": set(),
    "neighbour_transformer.cpus_per_worker": set(),
}
EXPECTED = {
    "digits": {**COMMON, **PREPROCESS, "resmem.temperature": FROM_INDEX},
    "bbc_news": {**COMMON, "resmem.temperature": FROM_INDEX, **{k: ALL for k in TEXT_SOURCE},
                 "text.freeze_encoder": ALL},
    "bbc_lm": {**COMMON, "resmem.temperature": FROM_EMBED, **{k: ALL for k in TEXT_SOURCE + LM_MODEL},
               "text.top_m": FROM_EMBED, "text.lm_embedding": FROM_EMBED, "text.prob_floor": {"evaluate"}},
    "diabetes": COMMON,
    # a given model is not trained: the train.* keys make nothing stale
    "precomputed": {**COMMON, "resmem.temperature": FROM_INDEX, "train": set()},
    "given_resnet18": {**COMMON, **PREPROCESS, "resmem.temperature": FROM_INDEX, "train": set()},
}


def expected(table: dict, key: str, done: set) -> set:
    matches = [k for k in table if key == k or key.startswith(k + ".")]
    rules = RULES[key]
    assert matches or rules.resource or rules.by_task or not set(rules.stages) & ALL, \
        f"{key} belongs to {rules.stages}: say in the table which stages it makes stale"
    stale = table[max(matches, key=len)] if matches else set()
    if key.startswith("neighbour_transformer.") and key != "neighbour_transformer.enabled" \
            and "transformer" not in done:
        stale = set()  # a disabled Transformer's settings change nothing that ran
    return stale & done


def changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, list):
        return value + value[-1:] if value else [1]
    return f"{value}-changed"


def set_key(config: dict, key: str, value) -> dict:
    out = copy.deepcopy(config)
    node = out
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return out


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_key_makes_exactly_its_stages_stale(name, tmp_path):
    cfg = load_config(f"jobs/configs/{name}.yaml", (f"run_dir={tmp_path}",))
    run = RunDir(tmp_path)
    config = cfg.to_dict()
    done = {s for s in ALL if enabled(STAGES[s], cfg) or s == "tune"}
    for stage in [s for s in STAGES if s in done]:  # table order: readers after what they read
        run.mark_running(stage, config)
        if STAGES[stage].folder:
            (run.root / STAGES[stage].folder).mkdir(exist_ok=True)
            (run.root / STAGES[stage].folder / "out.bin").write_bytes(stage.encode())
        run.mark_done(stage, config)
    keys = {s: stage_keys(s, cfg) for s in done}
    assert all(run.stale_reason(s, config, keys[s]) is None for s in done)
    table = EXPECTED[name]
    for key, _ in leaf_keys():
        old = config
        for part in key.split("."):
            old = old[part]
        new = set_key(config, key, changed(old))
        stale = {s for s in done if run.stale_reason(s, new, keys[s]) is not None}
        assert stale == expected(table, key, done), f"{name}: {key}"


def test_a_rerun_upstream_or_a_changed_input_makes_readers_stale(tmp_path):
    cfg = load_config("jobs/configs/digits.yaml", (f"run_dir={tmp_path}", "neighbour_transformer.enabled=false"))
    run, config = RunDir(tmp_path), cfg.to_dict()
    for stage in ("train", "embed", "index", "evaluate"):
        run.mark_running(stage, config)
        (run.root / STAGES[stage].folder).mkdir(exist_ok=True)
        (run.root / STAGES[stage].folder / "out.bin").write_bytes(b"v1")
        run.mark_done(stage, config)
    # a stage's outputs change under it (resmem memorize adds shards): its readers are stale
    (run.index / "shard-00009.npz").write_bytes(b"added")
    run.update_outputs("index")
    assert run.stale_reason("index", config, stage_keys("index", cfg)) is None
    assert run.stale_reason("evaluate", config, stage_keys("evaluate", cfg)) == "what it read changed: index"
    # rerunning a stage drops every stage that read it, transitively
    run.mark_running("embed", config)
    assert set(run.manifest()["stages"]) == {"train", "embed"}


def ownership_problems(rules: dict, read_by_tasks: set) -> list[str]:
    """A key that is not a resource names the stages whose outputs follow from it (on the
    field or its section), or is left to the tasks (Task.reads) and read by one of them."""
    problems = []
    for key, r in rules.items():
        if set(r.stages) - set(STAGES):
            problems.append(f"{key}: unknown stage in {r.stages}")
        elif r.resource:
            continue
        elif not (r.stages or r.by_task):
            problems.append(f"{key}: no stage owns it (declare stages= or by_task= in schema.py)")
        elif not r.stages and not any(key == k or key.startswith(k + ".") for k in read_by_tasks):
            problems.append(f"{key} is left to the tasks, and no task reads it")
    return problems


def tasks_reads() -> set:
    tasks = {task_for(load_config(path)) for path in glob.glob("jobs/configs/*.yaml")}
    return {key for task in tasks for keys in task.reads.values() for key in keys}


def test_every_key_is_owned_by_a_stage_or_left_to_the_tasks():
    read_by_tasks = tasks_reads()
    assert {"resmem.temperature", "text.top_m", "text.freeze_encoder"} <= read_by_tasks
    assert ownership_problems(RULES, read_by_tasks) == []


def test_a_new_key_without_a_stage_fails(monkeypatch):
    orphan = dataclasses.replace(RULES["resmem.k"], stages=())
    assert ownership_problems({**RULES, "resmem.new_knob": orphan}, tasks_reads()) == \
        ["resmem.new_knob: no stage owns it (declare stages= or by_task= in schema.py)"]
    # owned, but missing from the table above: the walk over the keys fails on it
    monkeypatch.setitem(RULES, "resmem.new_knob", RULES["resmem.k"])
    with pytest.raises(AssertionError, match="resmem.new_knob belongs to"):
        expected(EXPECTED["digits"], "resmem.new_knob", ALL)


# --- the stage envelope (store/rundir.py: stage_entry) ----------------------------------------

def finished_run(tmp_path) -> tuple[RunDir, dict]:
    cfg = load_config("jobs/configs/digits.yaml", (f"run_dir={tmp_path}",))
    run, config = RunDir(tmp_path), cfg.to_dict()
    for stage in ("train", "embed", "index"):
        run.mark_running(stage, config)
        run.mark_done(stage, config)
    return run, cfg


def envelope(fail_before=None, fail_after=None):
    """An embed stage under stage_entry that fails where told."""
    from resmem_ray.store.rundir import stage_entry

    @stage_entry("embed")
    def fake_embed(cfg):
        run = RunDir(cfg.run_dir)
        if fail_before:
            raise fail_before
        yield run
        assert run.manifest()["stages"]["embed"]["status"] == "running"
        if fail_after:
            raise fail_after
        return "value", {"rows": {"train": 3}}

    return fake_embed


def test_a_stage_runs_inside_its_manifest_entry(tmp_path):
    run, cfg = finished_run(tmp_path)
    assert envelope()(cfg) == "value"
    entry = run.manifest()["stages"]["embed"]
    assert entry["status"] == "done" and entry["rows"] == {"train": 3} and entry["config"] == cfg.to_dict()
    assert "index" not in run.manifest()["stages"]  # it read the old embeddings


def test_a_stage_that_stops_is_marked_and_its_checks_touch_nothing(tmp_path):
    from resmem_ray.errors import ResMemError

    run, cfg = finished_run(tmp_path)
    before = run.manifest()
    with pytest.raises(ResMemError):
        envelope(fail_before=ResMemError("bad input"))(cfg)
    assert run.manifest() == before  # nothing started: the finished stages stay finished
    with pytest.raises(ResMemError):
        envelope(fail_after=ResMemError("disk full"))(cfg)
    entry = run.manifest()["stages"]["embed"]
    assert (entry["status"], entry["error"]) == ("failed", "disk full")
    assert run.manifest()["stages"]["train"]["status"] == "done"
    with pytest.raises(KeyboardInterrupt):
        envelope(fail_after=KeyboardInterrupt())(cfg)
    assert run.manifest()["stages"]["embed"]["status"] == "interrupted"


def test_a_stage_function_must_yield_where_its_work_begins():
    from resmem_ray.store.rundir import stage_entry

    with pytest.raises(TypeError, match="must yield its RunDir"):
        stage_entry("embed")(lambda cfg: {})

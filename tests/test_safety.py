"""Safe to operate: bad input gets one line and exit 2, leaves the run directory as it
was; nothing writes outside its folder; one writer per run directory; no hang; Ctrl-C,
SIGTERM and SIGKILL leave nothing running."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import typing
import zipfile
from pathlib import Path

import numpy as np
import pytest

from resmem_ray.cli import main
from resmem_ray.config import load_config
from resmem_ray.errors import ResMemError
from resmem_ray.schema import Config, leaf_keys
from resmem_ray.stages.serve import PROCESSES
from resmem_ray.store.artifacts import load_index_manifest
from resmem_ray.store.files import file_hashes, sha256, write_json
from resmem_ray.store.rundir import RunDir
from resmem_ray.tasks.image_data import load_splits

from .conftest import DIGITS_ARGS
from .ray_head import MotoS3
from .test_pipeline import one_error_line
from .test_serve import free_port


def run_args(run_dir, *extra):
    return [*DIGITS_ARGS, f"run_dir={run_dir}", *extra]


# --- the run directory -------------------------------------------------------------------

def test_a_remote_manifest_cannot_write_outside_the_mirror(s3, monkeypatch, tmp_path):
    for k, v in MotoS3.CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RESMEM_CACHE", str(tmp_path / "cache"))
    for name, manifest, message in [
            ("escape", {"stages": {"embed": {"status": "done", "outputs": {"../../../owned.txt": "0"}}}},
             "not a plain path inside the folder"),
            ("absolute", {"stages": {"embed": {"status": "done", "outputs": {str(tmp_path / "owned.txt"): "0"}}}},
             "not a plain path inside the folder"),
            ("stage", {"stages": {"evil": {"status": "done", "folder": "..", "outputs": {"owned.txt": "0"}}}},
             "lists an unknown stage 'evil'"),
            ("list", [], "is not a run manifest")]:
        with s3.fs.open_output_stream(f"{s3.bucket}/hostile/{name}/manifest.json") as f:
            f.write(json.dumps(manifest).encode())
        with s3.fs.open_output_stream(f"{s3.bucket}/hostile/owned.txt") as f:
            f.write(b"x")
        with pytest.raises(ResMemError, match=message):
            RunDir(s3.uri(f"hostile/{name}"))
    assert not [p for p in tmp_path.rglob("owned.txt")]


def test_a_folder_that_is_not_a_run_directory_is_refused(ray_session, tmp_path, capsys):
    folder = tmp_path / "thesis"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "notes.txt").write_text("mine")
    (folder / "draft.tex").write_text("mine too")
    before = file_hashes(folder)
    assert main(["run", *run_args(folder)]) == 2
    assert "is a folder that is not empty and not a resmem run directory" in one_error_line(capsys)
    assert file_hashes(folder) == before and sorted(p.name for p in folder.iterdir()) == ["draft.tex", "model"]


@pytest.mark.parametrize("where,message", [("file", "is a file, not a run directory"),
                                           ("/proc/resmem-run", "resmem: error: ")])
def test_run_dir_in_a_place_that_cannot_hold_one(ray_session, tmp_path, capsys, where, message):
    run_dir = tmp_path / "plain.txt" if where == "file" else Path(where)
    if where == "file":
        run_dir.write_text("x")
    assert main(["run", *run_args(run_dir)]) == 2
    assert message in one_error_line(capsys)


def digits_examples(path: Path, labels_shift: int, pick) -> Path:
    cfg = load_config("jobs/configs/digits.yaml")
    test = load_splits(cfg.data, cfg.seed)[0]["test"]
    np.savez(path, images=test.images[pick], labels=(test.labels[pick] + labels_shift) % 10)
    return path


def test_a_held_lock_refuses_a_second_writer(run_copy, tmp_path, capsys):
    examples = digits_examples(tmp_path / "new.npz", 1, np.arange(5))
    before = file_hashes(run_copy)
    with RunDir(run_copy).lock("resmem memorize --examples a.npz"):
        assert main(["memorize", *run_args(run_copy), "--examples", str(examples)]) == 2
    line = one_error_line(capsys)
    assert f"is in use by pid {os.getpid()}" in line and "(resmem memorize --examples a.npz)" in line
    assert file_hashes(run_copy) == before


@pytest.mark.timeout(240)
def test_two_memorize_at_once_lose_nothing(run_copy, tmp_path):
    files = [digits_examples(tmp_path / f"{i}.npz", i + 1, np.arange(i, 40, 2)) for i in range(2)]
    cmd = [sys.executable, "-m", "resmem_ray.cli", "memorize", *run_args(run_copy)]
    procs = [subprocess.Popen([*cmd, "--examples", str(f)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for f in files]
    outs = [p.communicate(timeout=200) for p in procs]
    codes = sorted(p.returncode for p in procs)
    index = json.loads((run_copy / "index" / "manifest.json").read_text())
    memorized = index.get("memorized", [])
    if codes == [0, 0]:  # one after the other: both sets kept
        assert sorted(m["source"] for m in memorized) == sorted(map(str, files))
    else:  # one refused with a clear line, the other's examples kept
        assert codes == [0, 2], outs
        refused = next(err for (_, err), p in zip(outs, procs) if p.returncode == 2)
        assert refused.strip().splitlines()[-1].startswith("resmem: error: run directory")
        assert "is in use by pid" in refused
        assert len(memorized) == 1 and memorized[0]["rows"] == 20
    assert index["rows"] == sum(s["rows"] for s in index["shards"])


def test_leftovers_of_a_killed_writer_are_removed(run_copy):
    (run_copy / ".model.0123.tmp").mkdir()
    (run_copy / "embeddings" / ".train.4567.tmp").mkdir()
    (run_copy / "index" / ".manifest.json.89ab.tmp").write_text("{")
    (run_copy / "index" / "memorized").mkdir()
    (run_copy / "index" / "memorized" / ".000000001797.parquet.42.tmp").write_text("PAR1")
    with RunDir(run_copy).lock("test"):
        pass
    assert not list(run_copy.glob(".*.tmp")) and not list(run_copy.glob("*/.*.tmp"))
    assert not list(run_copy.glob("index/memorized/.*.tmp"))


# --- config values -------------------------------------------------------------------------

ZERO_IS_FINE = {"seed", "data.val_fraction", "data.test_fraction", "train.momentum", "train.weight_decay",
                "text.prob_floor", "embed.gpus_per_actor", "resmem.gate", "resmem.gate_softness",
                "tune.gate_softness", "resmem.knn_k", "resmem.knn_lambda", "tune.knn_lambda", "sweep.seeds",
                "serve.gpus", "serve.batch_wait_timeout_s"}


def numeric_keys() -> list[tuple[str, bool]]:
    """(key, is a list) of every int or float leaf of the schema."""
    out = []
    for key, _ in leaf_keys():
        *sections, leaf = key.split(".")
        cls = Config
        for s in sections:
            cls = typing.get_type_hints(cls)[s]
        tp = typing.get_type_hints(cls)[leaf]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union else [tp]
        is_list = typing.get_origin(inner[0]) is list
        base = typing.get_args(inner[0])[0] if is_list else inner[0]
        if base in (int, float):
            out.append((key, is_list))
    return out


def test_every_numeric_key_refuses_nan_inf_zero_and_negatives(run_copy, capsys):
    keys = numeric_keys()
    assert len(keys) > 60
    before = file_hashes(run_copy)
    for key, is_list in keys:
        for value in (".nan", ".inf", "-1", "0"):
            text = f"[{value}]" if is_list else value
            if value == "0" and key in ZERO_IS_FINE:
                load_config("jobs/configs/digits.yaml", (f"{key}={text}",))  # a legal setting
                continue
            assert main(["evaluate", *run_args(run_copy), f"{key}={text}"]) == 2, (key, text)
            line = one_error_line(capsys)
            assert f"config key {key}" in line, line
    assert file_hashes(run_copy) == before


@pytest.mark.parametrize("override,message", [
    ("evaluate.knn_ks=[]", "config key evaluate.knn_ks must be a non-empty list"),
    ("train.lr=-1", "config key train.lr must be positive, got -1"),
    ("resmem.sigma=nan", "config key resmem.sigma must be positive, got nan"),
])
def test_config_values_that_cannot_work(override, message):
    with pytest.raises(ResMemError, match=message.replace("[", r"\[")):
        load_config("jobs/configs/digits.yaml", (override,))


def test_a_yaml_syntax_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1,\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert f"config file {bad} is not valid YAML at line" in one_error_line(capsys)


# --- artifacts -----------------------------------------------------------------------------

ARTIFACTS = [("model/model.pt", "embed"), ("model/meta.json", "embed"), ("embeddings/train/*.parquet", "index"),
             ("embeddings/test/*.parquet", "evaluate"), ("index/shard-00001.faiss", "evaluate"),
             ("index/shard-00000.npz", "evaluate"), ("index/manifest.json", "evaluate")]


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "emptied": b"",
                      "bit-flipped": data[:-1] + bytes([data[-1] ^ 1])}[how])


@pytest.mark.parametrize("how", ["truncated", "bit-flipped", "emptied"])
@pytest.mark.parametrize("pattern,command", ARTIFACTS)
def test_a_damaged_artifact_is_one_line(run_copy, capsys, pattern, command, how):
    (path,) = list(run_copy.glob(pattern))[:1] or [None]
    corrupt(path, how)
    damaged = file_hashes(run_copy)
    assert main([command, *run_args(run_copy)]) == 2
    line = one_error_line(capsys)
    assert path.name in line and ("does not match its manifest hash" in line or "bytes, the manifest says" in line)
    assert file_hashes(run_copy) == damaged


def test_examples_that_are_not_an_npz(run_copy, tmp_path, capsys):
    single = tmp_path / "x.npy"
    np.save(single, np.zeros((2, 1, 8, 8), np.uint8))
    assert main(["memorize", *run_args(run_copy), "--examples", str(single)]) == 2
    assert "a single array, not an .npz archive" in one_error_line(capsys)
    pickled = tmp_path / "objects.npz"
    np.savez(pickled, images=np.array([object()], dtype=object), labels=np.zeros(1, np.int64))
    assert main(["memorize", *run_args(run_copy), "--examples", str(pickled)]) == 2
    line = one_error_line(capsys)
    assert "hold Python objects" in line and "allow_pickle" not in line


def test_memorize_makes_what_reads_the_memory_stale(run_copy, tmp_path, capsys):
    examples = digits_examples(tmp_path / "new.npz", 1, np.arange(10))
    assert main(["memorize", *run_args(run_copy), "--examples", str(examples)]) == 0
    capsys.readouterr()
    assert main(["status", str(run_copy)]) == 0
    assert "| evaluate | stale | what it read changed: index |" in capsys.readouterr().out
    assert main(["run", *run_args(run_copy)]) == 0
    out = capsys.readouterr().out
    assert "== index: finished" in out and "== evaluate ==" in out and "evaluate: finished" not in out
    metrics = json.loads((run_copy / "report" / "metrics.json").read_text())
    assert metrics["memory_rows"] == json.loads((run_copy / "index" / "manifest.json").read_text())["rows"]


def test_status_table(digits_run, capsys):
    assert main(["status", str(digits_run)]) == 0
    out = capsys.readouterr().out
    for stage in ("train", "embed", "index", "evaluate"):
        assert f"| {stage} | done |" in out
    assert main(["status", str(digits_run), *DIGITS_ARGS, "resmem.k=7"]) == 0
    assert "| evaluate | stale | config changed: resmem.k |" in capsys.readouterr().out


def test_status_overrides_change_the_runs_own_config(digits_run, capsys):
    assert main(["status", str(digits_run), "resmem.k=7"]) == 0
    out = capsys.readouterr().out
    for stage in ("train", "embed", "index"):
        assert f"| {stage} | done |" in out
    assert "| evaluate | stale | config changed: resmem.k |" in out
    assert main(["status", str(digits_run), "train.epochs=3", "resmem.k=5"]) == 0  # the values it ran with
    out = capsys.readouterr().out
    assert "stale" not in out and "| evaluate | done |" in out


def garble_stage(run_dir: Path, stage: str, field: str | None, value) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    if field:
        manifest["stages"][stage][field] = value
    else:
        manifest["stages"][stage] = value
    write_json(run_dir / "manifest.json", manifest)


@pytest.mark.parametrize("command", ["status", "index", "evaluate"])
@pytest.mark.parametrize("stage,field,value,problem", [
    ("embed", None, "done", "stage 'embed' is a string, not a mapping"),
    ("index", None, ["done"], "stage 'index' is a list, not a mapping"),
    ("train", "outputs", ["model.pt"], "stage 'train': outputs is a list, not a mapping"),
    ("evaluate", "seconds", "fast", "stage 'evaluate': seconds is a string, not a number or null")])
def test_a_run_manifest_of_the_wrong_shape_is_one_line(run_copy, capsys, command, stage, field, value, problem):
    garble_stage(run_copy, stage, field, value)
    before = file_hashes(run_copy)
    args = [str(run_copy)] if command == "status" else run_args(run_copy)
    assert main([command, *args]) == 2
    assert f"{run_copy / 'manifest.json'} is not a run manifest ({problem})" in one_error_line(capsys)
    assert file_hashes(run_copy) == before


def replace_index_manifest(run_dir: Path, data: bytes) -> Path:
    """index/manifest.json replaced by `data`, and vouched for by the run manifest (as a
    faulty writer would leave it): only its shape tells that it is not an index manifest."""
    path = run_dir / "index" / "manifest.json"
    path.write_bytes(data)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["stages"]["index"]["outputs"]["manifest.json"] = sha256(path)
    write_json(run_dir / "manifest.json", manifest)
    return path


def index_manifest_with(run_dir: Path, **changes) -> bytes:
    return json.dumps({**json.loads((run_dir / "index" / "manifest.json").read_text()), **changes}).encode()


@pytest.mark.parametrize("content,problem", [
    (lambda run: b'"index"', "it holds a string, not a mapping"),
    (lambda run: b"[1, 2]", "it holds a list, not a mapping"),
    (lambda run: b'{"dim": 8}', "missing rows, num_classes, distance"),
    (lambda run: index_manifest_with(run, shards=["shard-00000"]), "shards is not a non-empty list of mappings"),
    (lambda run: index_manifest_with(run, memorized="new.npz"), "memorized is not a list of mappings"),
    (lambda run: index_manifest_with(run, memorized=[{"rows": 3}]), "memorized entries without first_id, source")])
def test_an_index_manifest_of_the_wrong_shape_is_one_line(run_copy, capsys, content, problem):
    path = replace_index_manifest(run_copy, content(run_copy))
    before = file_hashes(run_copy)
    assert main(["evaluate", *run_args(run_copy)]) == 2
    line = one_error_line(capsys)
    assert f"{path} is not an index manifest ({problem}" in line and line.endswith("rerun `resmem index`")
    assert file_hashes(run_copy) == before


def test_index_rebuilds_over_a_garbage_index_manifest(run_copy, capsys, tmp_path):
    path = replace_index_manifest(run_copy, b"[]")
    (run_copy / "index" / "memorized").mkdir()
    (run_copy / "index" / "memorized" / "000000001797.parquet").write_bytes(b"PAR1")
    problem = f"{path} is not an index manifest (it holds a list, not a mapping)"
    assert main(["evaluate", *run_args(run_copy)]) == 2
    assert one_error_line(capsys).endswith(f"{problem}: rerun `resmem index`")
    assert main(["index", *run_args(run_copy)]) == 0
    out = capsys.readouterr().out
    assert f"[index] {problem}: no memorized rows carried over (1 file(s) of memorized rows dropped" in out
    assert not (run_copy / "index" / "memorized").exists()
    assert main(["evaluate", *run_args(run_copy)]) == 0
    binary = tmp_path / "manifest.json"
    binary.write_bytes(b"\xff\x00{")
    with pytest.raises(ResMemError, match=f"{binary} is not valid JSON"):
        load_index_manifest(binary)


# --- no hang -------------------------------------------------------------------------------

@pytest.mark.parametrize("shards,replicas,cpus", [(5, 1, 2.5), (3, 2, 3.0)])
def test_shard_actors_that_cannot_be_placed_fail_at_once(run_copy, capsys, shards, replicas, cpus):
    args = run_args(run_copy, f"index.num_shards={shards}", f"index.replicas={replicas}")
    assert main(["index", *args]) == 0
    capsys.readouterr()
    t0 = time.time()
    assert main(["evaluate", *args]) == 2
    assert time.time() - t0 < 30
    line = one_error_line(capsys)
    assert f"{shards} shards in {shards} actor(s) x {replicas} replicas = {shards * replicas} shard actors" in line
    assert f"= {cpus:g} CPUs, but this Ray instance has 2 CPUs" in line
    assert "evaluate" not in RunDir(run_copy).manifest()["stages"] or \
        RunDir(run_copy).manifest()["stages"]["evaluate"]["status"] == "done"


def test_shard_actors_that_wait_too_long_fail_within_the_timeout(run_copy, ray_session, capsys):
    @ray_session.remote(num_cpus=1.5)
    class Hog:
        def ping(self):
            return True

    hog = Hog.remote()
    ray_session.get(hog.ping.remote())
    try:
        assert main(["evaluate", *run_args(run_copy, "index.placement_timeout_s=3")]) == 2
    finally:
        ray_session.kill(hog)
    assert "not all could be placed within index.placement_timeout_s=3 s" in one_error_line(capsys)


# --- submit --------------------------------------------------------------------------------

def test_submit_leaves_secrets_behind(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    from resmem_ray.submit import runtime_env

    checkout = tmp_path / "checkout"
    for rel in ["jobs/run.py", "resmem_ray/cli.py", ".env", ".env.local", ".envrc", ".aws/credentials", "id_rsa",
                "id_ed25519.pub", "secrets/token.txt", "deploy/key.pem", ".netrc", ".git-credentials"]:
        (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
        (checkout / rel).write_text("x")
    package = tmp_path / "pkg.zip"
    create_package(str(checkout), package, include_gitignore=True,
                   excludes=runtime_env(str(checkout), None)["excludes"])
    names = set(zipfile.ZipFile(package).namelist())
    assert {"jobs/run.py", "resmem_ray/cli.py"} <= names
    assert not [n for n in names if n.startswith((".env", ".envrc", ".aws", "id_", "secrets", "deploy/key", ".netrc",
                                                  ".git-credentials"))], names


# --- the run's own output, Ctrl-C, cheap checks first ----------------------------------------

@pytest.mark.ray  # a `resmem` subprocess that starts Ray
@pytest.mark.timeout(300)
def test_ctrl_c_is_one_line_and_ray_chatter_stays_in_its_logs(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "resmem_ray.cli", "train", "--config", "jobs/configs/digits.yaml",
                             "train.epochs=200", "train.cpus_per_worker=0.5", f"run_dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "RAY_SERVE_THROUGHPUT_OPTIMIZED"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "[train] epoch 3/200" in line:
            break
    proc.send_signal(signal.SIGINT)
    try:
        rest, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:  # late in a full suite a first Ctrl-C has gone unheeded: press it again
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=90)
    out = "".join(lines) + rest
    assert proc.returncode == 130, err[-2000:]
    assert "resmem: interrupted" in err and "KeyboardInterrupt" not in err
    assert "Reporting training result" not in out + err and "Checkpoint successfully created" not in out + err
    assert RunDir(run_dir).manifest()["stages"]["train"]["status"] == "interrupted"


def start_serve(run_dir) -> subprocess.Popen:
    """`resmem serve` in its own session (a terminal's Ctrl-C reaches its whole process
    group), on its own Ray instance, once it answers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}  # cli.py's own settings
    proc = subprocess.Popen([sys.executable, "-m", "resmem_ray.cli", "serve", "--config", "jobs/configs/digits.yaml",
                             "neighbour_transformer.enabled=false", f"run_dir={run_dir}", f"serve.port={free_port()}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    proc.lines = []
    for line in proc.stdout:
        proc.lines.append(line)
        if line.startswith("[serve] the ingress replica(s) answer directly"):
            return proc
    raise AssertionError("".join(proc.lines) + proc.stderr.read()[-3000:])


def stop_serve(proc, how) -> tuple[str, str, float]:
    """(stdout after the signal, stderr without Ray's WARNING lines, seconds to exit)."""
    t0 = time.time()
    os.killpg(proc.pid, how) if how == signal.SIGINT else proc.send_signal(how)
    rest, err = proc.communicate(timeout=90)
    return rest, "\n".join(line for line in err.splitlines() if "WARNING" not in line), time.time() - t0


@pytest.mark.timeout(240)
def test_a_killed_serve_is_cleaned_by_the_next_which_ctrl_c_stops_at_once(run_copy):
    import psutil  # Ray's own copy (ray is imported)

    proc = start_serve(run_copy)
    for _ in range(100):  # written once the application is up
        if (run_copy / PROCESSES).exists():
            break
        time.sleep(0.1)
    recorded = json.loads((run_copy / PROCESSES).read_text())["processes"]
    proc.kill()
    proc.wait()
    time.sleep(2)
    left = [p["pid"] for p in recorded if psutil.pid_exists(p["pid"])
            and psutil.Process(p["pid"]).status() != psutil.STATUS_ZOMBIE]
    assert left  # Ray's agents outlive a SIGKILLed driver

    second = start_serve(run_copy)
    try:
        (line,) = [line for line in second.lines if "killed `resmem serve`" in line]
        # some of them may exit on their own before the second serve starts: it stops the rest
        stopped = re.search(rf"stopped (\d+) process\(es\) of the Ray instance of a killed `resmem serve` "
                            rf"\(pid {proc.pid}\)", line)
        assert stopped and 1 <= int(stopped[1]) <= len(left), line
        assert all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE for pid in left)
    finally:  # stopped whatever the assertions found: a serve left running outlives the suite
        rest, err, took = stop_serve(second, signal.SIGINT)  # a terminal's Ctrl-C: the whole process group
    assert second.returncode == 130 and err == "resmem: serve stopped" and rest == "", (err, rest)
    assert took < 30  # Serve's 30 s drain of a direct ingress replica is not waited for
    assert "Throughput optimized Ray Serve" not in "".join(second.lines)  # Serve's banner stays in its logs
    assert not (run_copy / PROCESSES).exists()


def test_sigterm_stops_serve_as_ctrl_c_does_with_exit_143(run_copy, ray_session, capsys, monkeypatch):
    """SIGTERM's handler raises Terminated (a KeyboardInterrupt): the CLI's one line, exit 128 + 15."""
    import resmem_ray.cli
    from resmem_ray.stages.serve import _terminate

    def serve_stage(command, cfg, **options):
        assert command == "serve"
        _terminate(signal.SIGTERM, None)

    monkeypatch.setattr(resmem_ray.cli, "run_stage", serve_stage)
    assert main(["serve", *DIGITS_ARGS, f"run_dir={run_copy}"]) == 143
    assert capsys.readouterr().err == "resmem: serve stopped\n"


def test_cheap_checks_come_before_ray_starts(tmp_path, capsys, monkeypatch):
    import resmem_ray.cli

    def no_ray(verbose=False):
        raise AssertionError("Ray started before the run directory was checked")

    monkeypatch.setattr(resmem_ray.cli, "init_ray", no_ray)
    assert main(["evaluate", *run_args(tmp_path / "empty")]) == 2
    assert "has no finished 'index' stage" in one_error_line(capsys)
    shutil.rmtree(tmp_path / "empty", ignore_errors=True)

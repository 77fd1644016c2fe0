"""`resmem serve` as a real Ray Serve application on loopback, real HTTP: its answers are
evaluate's, /memorize is read-your-writes and survives a restart and `resmem evaluate`,
bad requests are one clear 4xx that adds nothing, /memorize needs the token."""

import io
import json
import shutil
import socket
import urllib.error
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest

from resmem_ray.config import load_config
from resmem_ray.errors import ResMemError
from resmem_ray.store.files import read_json, sha256

TOKEN = "a-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body=None, content_type="application/json", token=None, method=None):
    """(status, JSON answer) of one request."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=data, headers=headers, method=method or ("POST" if data else "GET"))
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:  # a 500 from the framework is plain text
            return e.code, {"error": body.decode(errors="replace")}


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image[0]).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def app(digits_run, tmp_path_factory):
    from ray import serve

    from resmem_ray.stages.serve import replica_urls, start
    from resmem_ray.tasks.image_data import load_splits

    root = tmp_path_factory.mktemp("serve")
    run = root / "run"
    shutil.copytree(digits_run, run)
    (root / "token").write_text(TOKEN + "\n")
    cfg = load_config("jobs/configs/digits.yaml", (
        "neighbour_transformer.enabled=false", f"run_dir={run}", f"serve.port={free_port()}",
        f"serve.token_file={root / 'token'}", "serve.max_request_bytes=200000", "serve.max_examples=100"))
    test = load_splits(cfg.data, cfg.seed)[0]["test"]
    try:
        url = start(cfg)
        (direct,) = replica_urls(cfg.serve)  # one ingress replica, on its own port
        assert direct != url
        yield {"url": url, "direct": direct, "cfg": cfg, "run": run, "test": test}
    finally:
        serve.shutdown()


def predict(app, images) -> list[dict]:
    status, answer = http(app["url"] + "/predict", {"examples": [im.tolist() for im in images]})
    assert status == 200, answer
    return answer["predictions"]


def test_health_and_readiness(app):
    assert http(app["url"] + "/healthz") == (200, {"status": "ok"})
    assert http(app["direct"] + "/healthz") == (200, {"status": "ok"})
    status, ready = http(app["url"] + "/readyz")
    assert status == 200 and ready["rows"] == read_json(app["run"] / "index" / "manifest.json")["rows"]


def test_predictions_are_evaluates(app):
    expected = pq.read_table(app["run"] / "report" / "predictions.parquet").to_pandas().set_index("id")
    test = app["test"]
    answers = [a for start in range(0, len(test), 100) for a in predict(app, test.images[start:start + 100])]
    assert len(answers) == len(test) == len(expected)
    rows = expected.loc[test.ids]
    assert [a["base"]["class"] for a in answers] == rows["base"].tolist()
    assert [a["resmem"]["class"] for a in answers] == rows["resmem"].tolist()
    assert [a["neighbours"][0]["id"] for a in answers] == rows["nn1_id"].tolist()
    first = answers[0]
    assert len(first["neighbours"]) == app["cfg"].resmem.k and first["gate"] == app["cfg"].resmem.gate
    assert np.isclose(sum(first["base"]["probs"]), 1.0)
    # one PNG body answers as its array does (up to float rounding: another batch size)
    status, answer = http(app["url"] + "/predict", png(test.images[0]), content_type="image/png")
    (one,) = answer["predictions"]
    assert status == 200 and one["resmem"]["class"] == first["resmem"]["class"]
    assert [n["id"] for n in one["neighbours"]] == [n["id"] for n in first["neighbours"]]
    assert np.allclose(one["resmem"]["probs"], first["resmem"]["probs"], atol=1e-5)
    # the ingress replica's own port answers as the proxy does
    status, answer = http(app["direct"] + "/predict", {"examples": [im.tolist() for im in test.images[:20]]})
    assert status == 200 and [a["resmem"]["class"] for a in answer["predictions"]] == rows["resmem"].tolist()[:20]


def test_an_application_that_cannot_be_placed_is_refused_at_once(app):
    import dataclasses

    from resmem_ray.stages.serve import start

    cfg = app["cfg"]
    too_many = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, replicas=9, cpus=0.5))
    with pytest.raises(ResMemError, match=r"asks for 4.7 CPUs .*serve.replicas=9 x serve.cpus=0.5.* has 2"):
        start(too_many)
    sharded = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, shard_actors=True),
                                  index=dataclasses.replace(cfg.index, cpus_per_shard=1.0))
    with pytest.raises(ResMemError, match=r"shard actors 2 \(index\.\*\)"):
        start(sharded)


def test_the_client_prints_a_table(app, tmp_path, capsys):
    from resmem_ray.cli import main

    (tmp_path / "a.png").write_bytes(png(app["test"].images[0]))
    np.savez(tmp_path / "b.npz", images=app["test"].images[1:3])
    assert main(["predict", "--url", app["url"], str(tmp_path / "a.png"), str(tmp_path / "b.npz")]) == 0
    out = capsys.readouterr().out.splitlines()
    answers = predict(app, app["test"].images[:3])
    assert [line.split("|")[1].strip() for line in out[2:]] == ["a.png", "b.npz[0]", "b.npz[1]"]
    assert [int(line.split("|")[4]) for line in out[2:]] == [a["resmem"]["class"] for a in answers]


def test_a_killed_model_replica_loses_no_request(app):
    import threading

    import ray

    images, results = app["test"].images[:40], {}

    def client(worker: int):
        for i in range(worker, len(images), 4):
            results[i] = http(app["url"] + "/predict", {"examples": [images[i].tolist()]})

    expected = predict(app, images)
    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    while len(results) < 5:
        threading.Event().wait(0.05)
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#Model#" in a["name"]]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    for t in threads:
        t.join()
    assert sorted(results) == list(range(len(images)))
    assert all(status == 200 for status, _ in results.values())
    assert [results[i][1]["predictions"][0]["resmem"]["class"] for i in range(len(images))] == \
        [a["resmem"]["class"] for a in expected]


def manifest_hash(app) -> str:
    return sha256(app["run"] / "index" / "manifest.json")


@pytest.mark.parametrize("path, body, content_type, token, status, words", [
    ("/predict", {"examples": [np.zeros((7, 7), int).tolist()]}, "application/json", None, 400, "shape (1, 7, 7)"),
    ("/predict", "png 9x9", "image/png", None, 400, "a 9x9 image"),
    ("/predict", {"examples": [[[1.5] * 8] * 8]}, "application/json", None, 400, "integer pixel values"),
    ("/predict", {"examples": ["bm90IGEgcG5n"]}, "application/json", None, 400, "not a readable image"),
    ("/predict", b'{"examples": [', "application/json", None, 400, "not valid JSON"),
    ("/predict", {"examples": []}, "application/json", None, 400, "no examples"),
    ("/predict", {"images": []}, "application/json", None, 400, '{"examples": [...]}'),
    ("/predict", {"examples": [np.zeros((8, 8), int).tolist()] * 101}, "application/json", None, 413,
     "serve.max_examples=100"),
    ("/predict", b"x" * 300_000, "application/json", None, 413, "serve.max_request_bytes=200000"),
    ("/predict", b'{"examples": ' + b"[" * 99_000 + b"]" * 99_000 + b"}", "application/json", None, 400,
     "nests JSON arrays or objects too deeply"),
    ("/memorize", {"examples": [np.zeros((8, 8), int).tolist()], "labels": [10]}, "application/json", TOKEN, 400,
     "labels[0]=10 is not a class"),
    ("/memorize", {"examples": [np.zeros((8, 8), int).tolist()], "labels": [1, 2]}, "application/json", TOKEN, 400,
     "labels must be a list of 1"),
    ("/memorize", {"examples": [np.zeros((8, 8), int).tolist()] * 2}, "application/json", TOKEN, 400,
     "labels must be a list of 2"),
    ("/memorize", {"examples": [], "labels": []}, "application/json", TOKEN, 400, "no examples"),
    ("/memorize?label=%C2%B2", "png 8x8", "image/png", TOKEN, 400, "needs its class as ?label=N, got '\u00b2'"),
    ("/memorize?label=--3", "png 8x8", "image/png", TOKEN, 400, "needs its class as ?label=N, got '--3'"),
    ("/memorize", {"examples": [np.zeros((8, 8), int).tolist()], "labels": [1]}, "application/json", None, 401,
     "Authorization: Bearer"),
    ("/memorize", {"examples": [np.zeros((8, 8), int).tolist()], "labels": [1]}, "application/json", "wrong", 403,
     "token is wrong"),
])
def test_bad_requests_are_one_clear_4xx_and_add_nothing(app, path, body, content_type, token, status, words):
    if body in ("png 9x9", "png 8x8"):
        body = png(np.zeros((1, int(body[-1]), int(body[-1])), np.uint8))
    before = manifest_hash(app)
    got, answer = http(app["url"] + path, body, content_type, token)
    assert got == status and words in answer["error"] and "\n" not in answer["error"], answer
    assert manifest_hash(app) == before


def test_memorize_is_read_your_writes(app):
    test, run = app["test"], app["run"]
    image, label = test.images[5], int(test.labels[5])
    new = (label + 1) % 10
    before = read_json(run / "index" / "manifest.json")
    status, answer = http(app["url"] + "/memorize", {"examples": [image.tolist()] * 3, "labels": [new] * 3},
                          token=TOKEN)
    assert status == 200, answer
    assert answer["ids"] == list(range(before["next_id"], before["next_id"] + 3))
    assert answer["memory_rows"] == before["rows"] + 3
    (after,) = predict(app, [image])  # the very next request sees the rows
    assert after["resmem"]["class"] == new
    assert {n["id"] for n in after["neighbours"][:3]} == set(answer["ids"])
    manifest = read_json(run / "index" / "manifest.json")
    assert manifest["rows"] == before["rows"] + 3 and manifest["memorized"][-1]["rows"] == 3
    app["memorized"] = (image, new, answer["ids"])


def test_a_restart_evaluate_and_index_keep_memorized_rows(app, capsys):
    from ray import serve

    from resmem_ray.cli import main
    from resmem_ray.stages.serve import APP, start

    image, new, ids = app["memorized"]
    serve.delete(APP)
    start(app["cfg"])
    (answer,) = predict(app, [image])
    assert answer["resmem"]["class"] == new and {n["id"] for n in answer["neighbours"][:3]} == set(ids)
    # a second write rewrites the write shard under a new number; the old one's files go
    old_shard = read_json(app["run"] / "index" / "manifest.json")["serve_shard"]
    status, added = http(app["url"] + "/memorize", {"examples": [app["test"].images[6].tolist()], "labels": [0]},
                         token=TOKEN)
    assert status == 200
    manifest = read_json(app["run"] / "index" / "manifest.json")
    assert manifest["serve_shard"] != old_shard and not list((app["run"] / "index").glob(f"shard-{old_shard:05d}.*"))
    assert [m["shard"] for m in manifest["memorized"]] == [manifest["serve_shard"]] * 2
    serve.delete(APP)  # evaluate's shard actors need the CPUs
    assert main(["evaluate", "--config", "jobs/configs/digits.yaml", "neighbour_transformer.enabled=false",
                 f"run_dir={app['run']}"]) == 0
    metrics = read_json(app["run"] / "report" / "metrics.json")
    assert metrics["memory_rows"] == manifest["rows"] == added["memory_rows"]
    # `resmem index` rebuilds the memory from the train split and the served rows
    assert main(["index", "--config", "jobs/configs/digits.yaml", "neighbour_transformer.enabled=false",
                 f"run_dir={app['run']}"]) == 0
    rebuilt = read_json(app["run"] / "index" / "manifest.json")
    assert rebuilt["rows"] == manifest["rows"] and "serve_shard" not in rebuilt
    assert [m["rows"] for m in rebuilt["memorized"]] == [3, 1]


def test_an_ivf_run_is_served_at_index_nprobe(app, run_copy):
    """FAISS keeps an IVF shard's build-time nprobe (1) in its file; serve's memory opens
    shards as evaluate's shard actors do, at index.nprobe, so its answers are evaluate's."""
    from ray import serve

    from resmem_ray.cli import main
    from resmem_ray.core.knn import prepare_queries
    from resmem_ray.runtime.shards import LocalShards
    from resmem_ray.schema import IndexConfig
    from resmem_ray.stages.serve import APP, start
    from resmem_ray.store.artifacts import read_split
    from resmem_ray.store.rundir import RunDir

    serve.delete(APP)  # evaluate's shard actors need the CPUs; the IVF run takes its place on the same port
    ivf = ("neighbour_transformer.enabled=false", f"run_dir={run_copy}", "index.factory=IVF8,Flat", "index.nprobe=4")
    assert main(["index", "--config", "jobs/configs/digits.yaml", *ivf]) == 0
    assert main(["evaluate", "--config", "jobs/configs/digits.yaml", *ivf]) == 0
    expected = pq.read_table(run_copy / "report" / "predictions.parquet").to_pandas().set_index("id")
    run, manifest = RunDir(run_copy), read_json(run_copy / "index" / "manifest.json")
    stored = read_split(run, "test", needed_by="test", columns=("id", "embedding"))
    queries = prepare_queries(stored["embedding"], manifest["distance"], manifest["normalize"])
    at_one = LocalShards(run.index, manifest["shards"], manifest["distance"], IndexConfig(nprobe=1)).search(queries, 1)
    nn1 = dict(zip(stored["id"].tolist(), at_one.ids[:, 0].tolist()))
    test = app["test"]
    rows = expected.loc[test.ids]
    other = [nn1[i] != j for i, j in zip(test.ids, rows["nn1_id"])]
    assert sum(other) >= 5  # at the files' nprobe=1 the nearest neighbours differ: the test tells them apart

    cfg = load_config("jobs/configs/digits.yaml", (*ivf, f"serve.port={app['cfg'].serve.port}"))
    try:
        url = start(cfg)
        answers = []
        for a in range(0, len(test), 100):
            status, answer = http(url + "/predict", {"examples": [im.tolist() for im in test.images[a:a + 100]]})
            assert status == 200, answer
            answers += answer["predictions"]
    finally:
        serve.delete(APP)
    assert [a["neighbours"][0]["id"] for a in answers] == rows["nn1_id"].tolist()
    assert [a["base"]["class"] for a in answers] == rows["base"].tolist()
    assert [a["resmem"]["class"] for a in answers] == rows["resmem"].tolist()


def test_a_token_lm_is_not_served():
    from resmem_ray.tasks.registry import task_for

    with pytest.raises(ResMemError, match="not served by `resmem serve`"):
        task_for(load_config("jobs/configs/bbc_lm.yaml")).serve_inputs([], {})

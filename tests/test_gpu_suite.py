"""benchmarks/gpu_suite.py: its dry run executes every step on the CPU in the session's
Ray instance; a failing, slow or impossible step leaves the others' figures."""

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "gpu_suite", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py")
gpu_suite = sys.modules["gpu_suite"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_suite)


def numbers(figures):
    if isinstance(figures, dict):
        for value in figures.values():
            yield from numbers(value)
    elif isinstance(figures, list):
        for value in figures:
            yield from numbers(value)
    elif isinstance(figures, (int, float)) and not isinstance(figures, bool):
        yield figures


@pytest.mark.timeout(180)
def test_the_dry_run_executes_every_step(ray_session, tmp_path, monkeypatch):
    out, results = tmp_path / "gpu.json", tmp_path / "RESULTS.md"
    argv = ["--dry-run", "--json", str(out), "--write-results", "--out", str(results)]
    monkeypatch.setattr(sys, "argv", ["benchmarks/gpu_suite.py", *argv])
    assert gpu_suite.main(argv) == 0
    steps = json.loads(out.read_text())["steps"]
    assert set(steps) == set(gpu_suite.STEPS)
    for name, step in steps.items():
        assert step["status"] == "ok", (name, step)
        values = list(numbers(step["figures"]))
        assert values and all(math.isfinite(v) and v > 0 for v in values), (name, step)
    train = steps["train"]["figures"]
    assert train["epochs"] == 1 and train["train_images"] == 180 and train["images_per_s"] > 0
    assert set(steps["embed"]["figures"]) == {"images_per_s_1_actors"}
    for dim in ("16", "32"):  # a tiny exact search: the bfloat16 scan's re-rank finds every neighbour
        assert steps["lowp"]["figures"][dim]["recall@30"] == 1.0
    found = steps["faiss_gpu"]["figures"]["dims"]["16"]
    assert found["faiss-cpu Flat"]["recall@30"] == 1.0 and 0 < found["faiss-cpu IVF16,Flat nprobe=4"]["recall@30"] <= 1
    lm = steps["lm"]["figures"]
    assert lm["memory_rows"] == 24 * 15 and lm["test_tokens"] == 8 * 15 and len(lm) == 5
    text = results.read_text()
    assert "<!-- section: gpu_suite.py dry-run -->" in text and "error:" not in text
    assert all(f"| {name} | (the step) | ok in " in text for name in gpu_suite.STEPS)


def run(tmp_path, *argv):
    out = tmp_path / "gpu.json"
    assert gpu_suite.main(["--dry-run", "--json", str(out), *argv]) == 0
    return json.loads(out.read_text())["steps"]


def test_a_failing_step_records_its_error_line_and_the_next_step_runs(tmp_path, monkeypatch):
    def broken(s):
        raise ValueError("memory shape (3, 4) is not (3, 5)\nsecond line")

    monkeypatch.setitem(gpu_suite.STEPS, "lowp", broken)
    steps = run(tmp_path, "--steps", "lowp", "faiss_gpu")
    assert steps["lowp"]["status"] == "error"
    assert steps["lowp"]["error"] == "ValueError: memory shape (3, 4) is not (3, 5)"
    assert steps["faiss_gpu"]["status"] == "ok" and steps["faiss_gpu"]["figures"]["dims"]


def test_a_step_over_its_limit_is_stopped_and_one_past_the_budget_skipped(tmp_path, monkeypatch):
    def slow(s):
        time.sleep(30)

    monkeypatch.setitem(gpu_suite.STEPS, "lowp", slow)
    monkeypatch.setitem(gpu_suite.LIMITS, "lowp", 1)
    t0 = time.perf_counter()
    steps = run(tmp_path, "--steps", "lowp", "--budget", "100")
    assert time.perf_counter() - t0 < 10
    assert steps["lowp"] == {"status": "error", "error": "TimeoutError: stopped after its 1 s limit",
                             "seconds": steps["lowp"]["seconds"]}
    steps = run(tmp_path, "--budget", "0")
    assert {s["status"] for s in steps.values()} == {"skipped"} and len(steps) == len(gpu_suite.STEPS)
    assert steps["train"]["reason"] == "time budget (0 s) spent"


@pytest.mark.skipif(gpu_suite.faiss_gpu_missing() is None, reason="this faiss searches on a GPU")
def test_faiss_gpu_without_gpu_faiss_or_wheel_is_skipped_with_the_reason(tmp_path):
    suite = gpu_suite.Suite(dry=False, device="cuda", wheels=None, tmp=tmp_path)
    with pytest.raises(gpu_suite.Skipped, match="no GPU support or sees no GPU, and no --wheels DIR was given"):
        gpu_suite.faiss_step(suite)
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "faiss_cpu-1.15.1-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    suite.wheels = str(tmp_path / "wheels")
    with pytest.raises(gpu_suite.Skipped, match=r"wheels holds no faiss_gpu\*.whl or faiss_cuda\*.whl"):
        gpu_suite.faiss_step(suite)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_without_a_gpu_only_the_dry_run_runs(capsys):
    assert gpu_suite.main([]) == 2
    assert "torch sees no CUDA GPU here; --dry-run" in capsys.readouterr().err


def test_training_batches_are_normalised_on_the_device_they_arrive_on():
    """Ray Train hands a GPU worker its batches on the GPU; "meta" stands in for CUDA here."""
    from resmem_ray.tasks.image_data import normalize

    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8, device="meta")
    assert normalize(x, "cifar10").device.type == "meta"

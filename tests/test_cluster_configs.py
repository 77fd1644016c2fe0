"""cluster/: launcher configs checked against Ray's own schema, the KubeRay manifests and
the runtime env parsed with the fields they need, and secure defaults on all of them."""

from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_config_matches_rays_schema(name):
    import jsonschema
    from ray.autoscaler._private.util import validate_config  # ray/autoscaler/ray-schema.json

    config = load(name)
    validate_config(config)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # no work on the head
    workers = [t for n, t in types.items() if n != config["head_node_type"]]
    assert workers and all(t["max_workers"] > t["min_workers"] == 0 for t in workers)  # autoscaling from 0
    assert "gpu" in config["docker"]["image"]
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in yaml.safe_dump(config)
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"

    config["available_node_types"]["head"]["typo"] = 1  # the schema does catch mistakes
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == "2.60.0" and spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # port-forward, never a public service
    assert head["template"]["spec"]["containers"][0]["image"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] and container["resources"]["limits"]["nvidia.com/gpu"]


def test_kuberay_raycluster():
    manifest = load("kuberay-raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert manifest["metadata"]["name"]
    _check_cluster_spec(manifest["spec"])


def test_kuberay_rayjob_runs_the_pipeline():
    manifest = load("kuberay-rayjob.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    assert "python -m jobs run --config jobs/configs/imagenet.yaml run_dir=s3://" in spec["entrypoint"]
    assert (Path(__file__).resolve().parents[1] / "jobs/configs/imagenet.yaml").is_file()
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    assert spec["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(spec["rayClusterSpec"])


def test_runtime_env_file(tmp_path):
    from resmem_ray.submit import runtime_env

    env = runtime_env(str(CLUSTER.parent), str(CLUSTER / "runtime_env.yaml"))
    assert env["working_dir"] == str(CLUSTER.parent) and ".venv" in env["excludes"]
    assert any(p.startswith("torch") for p in env["pip"]) and "conda" not in env
    bad = tmp_path / "env.yaml"
    bad.write_text("pip: [torch]\nconda: {dependencies: [numpy]}\n")
    from resmem_ray.errors import ResMemError

    with pytest.raises(ResMemError, match="cannot be combined"):
        runtime_env(str(CLUSTER.parent), str(bad))

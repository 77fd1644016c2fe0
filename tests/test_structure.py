"""The architecture holds: no import cycles, one stage list, stages that hold no task code."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from resmem_ray.cli import main
from resmem_ray.stage_table import STAGES
from resmem_ray.submit import JOB_STAGES

PACKAGE = Path(__file__).resolve().parent.parent / "resmem_ray"


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (module- and function-level alike)."""
    modules = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in root.rglob("*.py")}
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and modules[t].name != "__init__.py":
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.b"]]


def test_no_import_cycles_in_the_package():
    graph = import_graph(PACKAGE)
    assert len(graph) > 30
    assert cycles(graph) == []


def test_layers_point_one_way():
    """core and store know nothing of tasks, runtime or stages; tasks know no stage."""
    graph = import_graph(PACKAGE)
    below = {"resmem_ray.core": ("tasks", "runtime", "stages", "pipeline", "cli", "store"),
             "resmem_ray.store": ("tasks", "runtime", "stages", "pipeline", "cli"),
             "resmem_ray.tasks": ("stages", "pipeline", "cli"),
             "resmem_ray.runtime": ("tasks", "stages", "pipeline", "cli")}
    for module, imports in graph.items():
        for layer, forbidden in below.items():
            if module.startswith(layer + "."):
                bad = [i for i in imports if i.split(".")[1] in forbidden]
                assert not bad, f"{module} imports {bad}"


def test_no_stage_tests_the_model_or_dataset_name():
    """Stages ask the task registry; a test of model.name / data.name belongs in a task."""
    for path in (PACKAGE / "stages").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                text = ast.unparse(node)
                assert not re.search(r"\b(model|data)\.name\b", text), f"{path.name}: {text}"


def test_the_stage_list_exists_once():
    names = set(STAGES)
    assert set(JOB_STAGES) == names | {"run"}
    # one job entry point, `python -m jobs STAGE` (test_pipeline runs it for each of JOB_STAGES)
    assert {p.name for p in (PACKAGE.parent / "jobs").glob("*.py")} == {"__init__.py", "__main__.py"}
    for stage in STAGES.values():
        module, function = stage.function.split(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function)), stage.name
        assert set(stage.reads) <= names


@pytest.mark.parametrize("name", [*STAGES, "run"])
def test_cli_has_every_stage(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0 and f"usage: resmem {name}" in capsys.readouterr().out


def test_submit_help_names_every_stage():
    out = subprocess.run([sys.executable, "-m", "resmem_ray.cli", "submit", "--help"], capture_output=True, text=True)
    assert all(name in out.stdout for name in STAGES)


def test_stages_with_outputs_run_inside_their_manifest_entry():
    """Their functions are wrapped by store/rundir.py's stage_entry under their own name."""
    enveloped = set()
    for stage in STAGES.values():
        module, function = stage.function.split(":")
        wrapped_as = getattr(getattr(__import__(module, fromlist=[function]), function), "stage", None)
        assert wrapped_as in (None, stage.name), stage.name
        enveloped |= {stage.name} if wrapped_as else set()
    assert enveloped == {s.name for s in STAGES.values() if s.folder}


def codec_tests(source: str) -> list[str]:
    """The places in `source` that test a memory's codec: a comparison naming a codec, or a
    read of the manifest's codec (`manifest["codec"]`, `manifest.get("codec", ...)`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and re.search(r"\bcodec\b", ast.unparse(node)):
            found.append(ast.unparse(node))
        key = node.slice if isinstance(node, ast.Subscript) else (
            node.args[0] if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get" and node.args else None)
        if isinstance(key, ast.Constant) and key.value == "codec":
            found.append(ast.unparse(node))
    return found


def test_codec_finder_finds_a_codec_test():
    assert codec_tests('if manifest.get("codec") == "sparse":\n    pass\n')
    assert codec_tests('kind = manifest["codec"]\n')
    assert codec_tests("ok = task.codec != 'dense'\n")
    assert not codec_tests("check_codec(run, manifest, task.codec, task.name)\nmanifest.update(codec=task.codec)\n")


def test_no_stage_tests_the_memory_codec():
    """What a codec means belongs to the task (Task.codec and its methods) and the one check
    that the memory holds it (store/artifacts.check_codec); a stage that tests it holds task code."""
    for path in (PACKAGE / "stages").glob("*.py"):
        assert codec_tests(path.read_text()) == [], path.name


def test_extending_guide_names_files_and_tests_that_exist():
    """docs/extending.md lists, per kind of change, the files it touches and the tests that
    hold it: each named file (or its folder, for a new one) and each named test exist."""
    root = PACKAGE.parent
    text = (root / "docs" / "extending.md").read_text()
    paths = set(re.findall(r"`((?:resmem_ray|tests|jobs)/[\w/<>.]+\.(?:py|yaml))`", text))
    assert len(paths) >= 10
    for path in paths:
        target = root / path
        assert (target.parent if "<" in path else target).exists(), path
    sources = "".join(p.read_text() for p in (root / "tests").glob("test_*.py"))
    for test in re.findall(r"`(test_\w+)`", text):
        assert f"def {test}(" in sources, test

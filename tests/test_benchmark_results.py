"""benchmarks/RESULTS.md: each script rewrites its own section in place, under one index."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
_spec = importlib.util.spec_from_file_location("benchmark_results", BENCHMARKS / "results.py")
results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results)


def run_as(monkeypatch, script: str) -> None:
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{script}", "--rows", "10"])


def test_a_rerun_replaces_its_own_section_and_keeps_the_others(tmp_path, monkeypatch):
    out = tmp_path / "RESULTS.md"
    run_as(monkeypatch, "lookup.py")
    results.write(str(out), ["## Lookup", "", "Question: Does sharding cost?", "", "| a |", "| 1 |"])
    run_as(monkeypatch, "serve.py")
    results.write(str(out), ["## Serving digits", "", "Question: How fast?", "", "first digits run"], "digits")
    results.write(str(out), ["## Serving fashion", "", "Question: How fast?", "", "fashion run"], "fashion")
    run_as(monkeypatch, "lookup.py")
    results.write(str(out), ["## Lookup", "", "Question: Does sharding cost?", "", "| a |", "| 2 |"])
    results.write(str(out), ["## Lookup", "", "Question: Does sharding cost?", "", "| a |", "| 3 |"])
    run_as(monkeypatch, "serve.py")
    results.write(str(out), ["## Serving digits", "", "Question: How fast?", "", "second digits run"], "digits")

    text = out.read_text()
    assert list(results.read_sections(str(out))) == ["lookup.py", "serve.py digits", "serve.py fashion"]
    assert "| 3 |" in text and "| 1 |" not in text and "| 2 |" not in text
    assert "second digits run" in text and "first digits run" not in text and "fashion run" in text
    assert text.count("## Lookup") == 1
    # the index: one row per section, in the file's order, linking each title
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows == ["| `lookup.py` | Does sharding cost? | [Lookup](#lookup) |",
                    "| `serve.py digits` | How fast? | [Serving digits](#serving-digits) |",
                    "| `serve.py fashion` | How fast? | [Serving fashion](#serving-fashion) |"]
    assert text.index("| `lookup.py`") < text.index("<!-- section: lookup.py -->")
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]  # no temporary file left


def test_section_names_the_question_date_machine_and_command(monkeypatch):
    run_as(monkeypatch, "tune.py")
    lines = results.section("Tune", "What does it cost?", "intro")
    assert lines[:3] == ["## Tune", "", "Question: What does it cost?"]
    assert re.match(r"Run \d{4}-\d\d-\d\d on .*CPU cores.*; versions: ", lines[4])
    assert lines[5] == "Command: `python benchmarks/tune.py --rows 10`" and lines[-1] == "intro"


def test_a_broken_marker_is_refused_and_the_file_left_as_it_was(tmp_path, monkeypatch, capsys):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\n<!-- section: lookup.py -->\n## Lookup\n\nno end marker\n")
    before = out.read_text()
    run_as(monkeypatch, "lookup.py")
    with pytest.raises(SystemExit) as e:
        results.write(str(out), ["## Lookup", "", "new"])
    assert e.value.code == 2 and "without its `<!-- end -->`" in capsys.readouterr().err
    assert out.read_text() == before


def test_anchor_is_githubs():
    assert results.anchor("Serving digits: `resmem serve` requests/s") == "#serving-digits-resmem-serve-requestss"
    assert results.anchor("torch_lowp (bfloat16 + re-rank) on cpu") == "#torch_lowp-bfloat16--re-rank-on-cpu"


def test_results_md_is_in_the_written_form_and_every_script_writes_through_it():
    path = BENCHMARKS / "RESULTS.md"
    sections = results.read_sections(str(path))
    assert results.render(sections) == path.read_text()
    writers = [p for p in BENCHMARKS.glob("*.py") if 'default="benchmarks/RESULTS.md"' in p.read_text()]  # its --out
    assert {key.split()[0] for key in sections} <= {p.name for p in writers}
    for p in writers:
        source = p.read_text()
        assert "from results import section, write" in source and "write(args.out, lines" in source, p.name
        assert not re.search(r"open\([^)]*[\"']a[\"']", source), p.name

"""`resmem predict --url URL FILE...`: send examples to a `resmem serve` application and
print its answers as a table. Plain HTTP (urllib), no Ray.

FILE: .png images, an .npz holding `images` (N, C, H, W) uint8, or (text runs) a text
file, one example a line.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from resmem_ray.errors import ResMemError


def read_examples(paths: list[str]) -> list[tuple[str, object]]:
    """(name, JSON example) for every example in the files."""
    out = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise ResMemError(f"{path}: no such file")
        if p.suffix.lower() == ".png":
            out.append((p.name, base64.b64encode(p.read_bytes()).decode()))
        elif p.suffix.lower() == ".npz":
            try:
                with np.load(p, allow_pickle=False) as z:
                    images = z["images"]
            except (OSError, ValueError, KeyError):
                raise ResMemError(f"{path}: not an .npz holding an `images` array") from None
            out += [(f"{p.name}[{i}]", image.tolist()) for i, image in enumerate(images)]
        else:
            lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
            out += [(f"{p.name}:{i + 1}", line) for i, line in enumerate(lines)]
    if not out:
        raise ResMemError("no examples in the files given")
    return out


def post(url: str, payload: dict, token: str | None = None) -> dict:
    """POST JSON, return the JSON answer; a served error is one line naming the status."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", e.reason)
        except ValueError:
            message = e.reason
        raise ResMemError(f"{url}: HTTP {e.code}: {message}") from None
    except urllib.error.URLError as e:
        raise ResMemError(f"{url}: cannot connect ({e.reason})") from None


def predict(url: str, paths: list[str], per_request: int = 64) -> list[tuple[str, dict]]:
    examples = read_examples(paths)
    answers = []
    for start in range(0, len(examples), per_request):
        chunk = examples[start:start + per_request]
        answers += post(url.rstrip("/") + "/predict", {"examples": [x for _, x in chunk]})["predictions"]
    return [(name, answer) for (name, _), answer in zip(examples, answers)]


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| example | base | p | ResMem | p | gate | neighbours (id:label, distance) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, a in rows:
        b, r = a["base"], a["resmem"]
        near = ", ".join(f"{n['id']}:{n['label']} ({n['distance']:.3f})" for n in a["neighbours"])
        lines.append(f"| {name} | {b['class']} | {b['probs'][b['class']]:.3f} | {r['class']} | "
                     f"{r['probs'][r['class']]:.3f} | {a['gate']:.2f} | {near} |")
    return "\n".join(lines)

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
        if p.is_dir():
            raise ResMemError(f"{path}: a directory, not a file of examples")
        if not p.is_file():
            raise ResMemError(f"{path}: no such file")
        try:
            out += _examples_in(p, path)
        except OSError as e:  # unreadable
            raise ResMemError(f"{path}: {e.strerror or e}") from None
    if not out:
        raise ResMemError("no examples in the files given")
    return out


def _examples_in(p: Path, path: str) -> list[tuple[str, object]]:
    if p.suffix.lower() == ".png":
        return [(p.name, base64.b64encode(p.read_bytes()).decode())]
    if p.suffix.lower() == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                images = z["images"]
        except (OSError, ValueError, KeyError):
            raise ResMemError(f"{path}: not an .npz holding an `images` array") from None
        if images.ndim < 3:
            raise ResMemError(f"{path}: `images` has shape {images.shape}, not (N, C, H, W) or (N, H, W)")
        return [(f"{p.name}[{i}]", image.tolist()) for i, image in enumerate(images)]
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ResMemError(f"{path}: not UTF-8 text (byte {e.start}); a text file holds one example a line") from None
    lines = [line for line in text.splitlines() if line.strip()]
    return [(f"{p.name}:{i + 1}", line) for i, line in enumerate(lines)]


def post(url: str, payload: dict, token: str | None = None) -> dict:
    """POST JSON, return the JSON object answered; a served error, an answer that is not
    a JSON object or no answer at all is one line naming the URL."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]
        except (ValueError, TypeError, KeyError):
            message = e.reason
        raise ResMemError(f"{url}: HTTP {e.code}: {message}") from None
    except urllib.error.URLError as e:
        raise ResMemError(f"{url}: cannot connect ({e.reason})") from None
    except ValueError as e:  # not an http(s) URL
        raise ResMemError(f"{url}: {e}") from None
    except OSError as e:  # a timeout, a dropped connection
        raise ResMemError(f"{url}: no answer ({e or type(e).__name__})") from None
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ResMemError(f"{url}: the answer is not a JSON object ({body[:40]!r}): "
                          "is this a `resmem serve` application?")
    return answer


def predict(url: str, paths: list[str], per_request: int = 64) -> list[tuple[str, dict]]:
    examples = read_examples(paths)
    answers = []
    for start in range(0, len(examples), per_request):
        chunk = examples[start:start + per_request]
        where = url.rstrip("/") + "/predict"
        got = post(where, {"examples": [x for _, x in chunk]}).get("predictions")
        if not isinstance(got, list):
            raise ResMemError(f"{where}: the answer holds no `predictions` list")
        if len(got) != len(chunk):
            raise ResMemError(f"{where}: {len(got)} predictions answered for {len(chunk)} examples")
        answers += got
    return [(name, answer) for (name, _), answer in zip(examples, answers)]


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| example | base | p | ResMem | p | gate | neighbours (id:label, distance) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, a in rows:
        try:
            b, r = a["base"], a["resmem"]
            near = ", ".join(f"{n['id']}:{n['label']} ({n['distance']:.3f})" for n in a["neighbours"])
            lines.append(f"| {name} | {b['class']} | {b['probs'][b['class']]:.3f} | {r['class']} | "
                         f"{r['probs'][r['class']]:.3f} | {a['gate']:.2f} | {near} |")
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise ResMemError(f"the answer for {name} is not a prediction "
                              f"(base, resmem, gate, neighbours): {type(e).__name__} {e}") from None
    return "\n".join(lines)

"""`resmem predict` without Ray: a bad input file or a server's answer that is not a
prediction per example is one line and exit 2, never a traceback or a partial table.
The server is a tiny loopback HTTP server in a thread, answering what each test sets."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from resmem_ray.cli import main

from .test_pipeline import one_error_line


def prediction(cls: int) -> dict:
    probs = [0.0] * 10
    probs[cls] = 1.0
    return {"base": {"class": cls, "probs": probs}, "resmem": {"class": cls, "probs": probs}, "gate": 1.0,
            "neighbours": [{"id": 7, "label": cls, "distance": 0.25}]}


@pytest.fixture(scope="module")
def server():
    """A loopback server answering POST /predict with `server.answer(examples)` -> (status, type, bytes)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            examples = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["examples"]
            httpd.seen.append(examples)
            status, kind, body = httpd.answer(examples)
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def answering(server, fn):
    server.answer, server.seen = fn, []


def as_json(value, status=200) -> tuple:
    return status, "application/json", json.dumps(value).encode()


@pytest.fixture
def two_images(tmp_path):
    path = tmp_path / "two.npz"
    np.savez(path, images=np.zeros((2, 1, 8, 8), np.uint8))
    return path


def test_a_good_answer_is_a_table(server, two_images, capsys):
    answering(server, lambda examples: as_json({"predictions": [prediction(3) for _ in examples]}))
    assert main(["predict", "--url", server.url, str(two_images)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("|")[1].strip() for line in out[2:]] == ["two.npz[0]", "two.npz[1]"]
    assert [int(line.split("|")[4]) for line in out[2:]] == [3, 3]


@pytest.mark.parametrize("answer, words", [
    (lambda ex: (200, "text/html", b"<html><body>It works!</body></html>"), "the answer is not a JSON object"),
    (lambda ex: as_json(["a", "list"]), "the answer is not a JSON object"),
    (lambda ex: as_json({"ids": [1, 2]}), "the answer holds no `predictions` list"),
    (lambda ex: as_json({"predictions": [prediction(1)] * (len(ex) - 1)}), "1 predictions answered for 2 examples"),
    (lambda ex: as_json({"predictions": [prediction(1)] * (len(ex) + 1)}), "3 predictions answered for 2 examples"),
    (lambda ex: as_json({"predictions": [prediction(1), {"base": 4}]}),
     "the answer for two.npz[1] is not a prediction"),
    (lambda ex: as_json({"error": "example 0: bad"}, status=400), "HTTP 400: example 0: bad"),
    (lambda ex: (502, "text/html", b"<html>Bad gateway</html>"), "HTTP 502: Bad Gateway"),
])
def test_an_answer_that_is_not_one_prediction_per_example_is_one_line(server, two_images, capsys, answer, words):
    answering(server, answer)
    assert main(["predict", "--url", server.url, str(two_images)]) == 2
    assert words in one_error_line(capsys)  # and nothing on stdout: no table
    assert capsys.readouterr().out == ""


def test_no_server_and_no_url_are_one_line(two_images, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    assert main(["predict", "--url", f"http://127.0.0.1:{port}", str(two_images)]) == 2
    assert "cannot connect" in one_error_line(capsys)
    assert main(["predict", "--url", "127.0.0.1:8000", str(two_images)]) == 2
    assert "unknown url type" in one_error_line(capsys)


@pytest.mark.parametrize("name, make, words", [
    ("folder", lambda p: p.mkdir(), "a directory, not a file of examples"),
    ("latin1.txt", lambda p: p.write_bytes("caf\xe9 au lait\n".encode("latin-1")), "not UTF-8 text (byte 3)"),
    ("scalar.npz", lambda p: np.savez(p, images=np.uint8(3)), "`images` has shape (), not (N, C, H, W)"),
    ("flat.npz", lambda p: np.savez(p, images=np.zeros(64, np.uint8)), "`images` has shape (64,), not (N, C, H, W)"),
    ("other.npz", lambda p: np.savez(p, pixels=np.zeros((1, 8, 8), np.uint8)), "not an .npz holding an `images`"),
    ("missing.png", lambda p: None, "no such file"),
])
def test_a_bad_input_file_is_one_line(server, tmp_path, capsys, name, make, words):
    answering(server, lambda examples: as_json({"predictions": [prediction(0) for _ in examples]}))
    path = tmp_path / name
    make(path)
    assert main(["predict", "--url", server.url, str(path)]) == 2
    line = one_error_line(capsys)
    assert words in line and str(path) in line and not server.seen

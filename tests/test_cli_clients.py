"""`jaxserve chat` and `jaxserve complete` against a fake OpenAI-compatible server on loopback
that streams canned replies and records what it was sent. Tests the clients only."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jaxserve import cli

PIECES = ["Hel", "lo", " world"]


class _FakeOpenAI(BaseHTTPRequestHandler):
    """GET /v1/models lists two models; POST completions stream PIECES as server-sent events."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        models = [{"id": name, "object": "model", "created": 0, "owned_by": "test"}
                  for name in ("fake-model", "other-model")]
        body = json.dumps({"object": "list", "data": models}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(
            {"path": self.path, "auth": self.headers["Authorization"], "body": request})
        chat = self.path.endswith("/chat/completions")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in PIECES:
            if chat:
                choice = {"index": 0, "delta": {"role": "assistant", "content": piece},
                          "finish_reason": None}
            else:
                choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": None}
            chunk = {"id": "x", "created": 0, "model": request["model"], "choices": [choice],
                     "object": "chat.completion.chunk" if chat else "text_completion"}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def server(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_chat_quick_prints_the_stream(server, capsys):
    httpd, url = server
    assert cli.main(["chat", "--url", url, "-q", "hi there"]) == 0
    assert capsys.readouterr().out == "Hello world\n"
    [request] = httpd.requests
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer EMPTY"
    assert request["body"]["model"] == "fake-model" and request["body"]["stream"] is True
    assert request["body"]["messages"] == [{"role": "user", "content": "hi there"}]


def test_chat_repl_sends_the_history(server, capsys, monkeypatch):
    httpd, url = server
    monkeypatch.setattr("sys.stdin", io.StringIO("first\n\nsecond\n"))
    assert cli.main(["chat", "--url", url, "--model-name", "other-model", "--api-key", "k",
                     "--system-prompt", "Be brief."]) == 0
    assert capsys.readouterr().out == "Hello world\nHello world\n"
    assert [r["body"]["model"] for r in httpd.requests] == ["other-model", "other-model"]
    assert httpd.requests[1]["auth"] == "Bearer k"
    assert httpd.requests[1]["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "Hello world"},
        {"role": "user", "content": "second"}]


def test_complete_quick_and_repl(server, capsys, monkeypatch):
    httpd, url = server
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    assert cli.main(["complete", "--url", url, "--max-tokens", "5", "-q", "Once"]) == 0
    assert capsys.readouterr().out == "Hello world\n"
    [request] = httpd.requests
    assert request["path"] == "/v1/completions" and request["auth"] == "Bearer from-env"
    assert request["body"]["prompt"] == "Once" and request["body"]["max_tokens"] == 5
    monkeypatch.setattr("sys.stdin", io.StringIO("a\nb\n"))
    assert cli.main(["complete", "--url", url]) == 0
    assert capsys.readouterr().out == "Hello world\nHello world\n"
    assert [r["body"]["prompt"] for r in httpd.requests[1:]] == ["a", "b"]
    assert "max_tokens" not in httpd.requests[1]["body"]


def test_unreachable_server_is_one_error_line(capsys, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI) as closed:
        port = closed.server_address[1]  # bound, then closed: nothing listens there
    assert cli.main(["chat", "--url", f"http://127.0.0.1:{port}/v1", "--model-name", "m",
                     "-q", "hi"]) == 1
    assert capsys.readouterr().err.startswith("jaxserve: error: ")

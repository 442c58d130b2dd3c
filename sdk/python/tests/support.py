"""Test helpers: a live `tally` process, a scripted HTTP server, and a proxy that loses answers."""

import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Coroutine, Dict, List, Tuple, TypeVar

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[3]
STARTUP_SECONDS = 60


def unique(prefix: str) -> str:
    """A name no other test uses (lowercase, valid as a user id and as a provider name)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 1.0) -> Tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


class TallyProcess:
    """`tally` on an embedded database in a temporary folder, on free loopback ports."""

    def __init__(self, binary: Path) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="tally-sdk-test-"))
        self.wire_port, self.http_port, self.query_port = free_port(), free_port(), free_port()
        self.ingest_url = f"http://127.0.0.1:{self.http_port}"
        self.query_url = f"http://127.0.0.1:{self.query_port}"
        self.log_path = self.data_dir / "tally.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open while the process runs
        self.process = subprocess.Popen(
            [
                str(binary),
                "--data-dir",
                str(self.data_dir),
                "--wire-addr",
                f"127.0.0.1:{self.wire_port}",
                "--http-addr",
                f"127.0.0.1:{self.http_port}",
                "--query-addr",
                f"127.0.0.1:{self.query_port}",
            ],  # fmt: skip
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )
        self.api_key = self._wait_until_up()

    def _wait_until_up(self) -> str:
        deadline = time.monotonic() + STARTUP_SECONDS
        key_file = self.data_dir / "demo-api-key"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tally exited with {self.process.returncode}:\n{self.log()}")
            try:
                ready = key_file.exists() and all(
                    _get(f"{url}/health")[0] == 200 for url in (self.ingest_url, self.query_url)
                )
            except OSError:
                ready = False
            if ready:
                return key_file.read_text().splitlines()[0].strip()
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"tally did not answer /health within {STARTUP_SECONDS} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def tally_binary() -> Path:
    configured = os.environ.get("TALLY_BIN")
    if configured:
        return Path(configured)
    target = os.environ.get("CARGO_TARGET_DIR") or str(REPO / "target")
    return Path(target) / "debug" / "tally"


@dataclass
class Recorded:
    at: float
    method: str
    path: str
    body: bytes


@dataclass
class Scripted:
    """An answer of a :class:`ScriptedServer`."""

    status: int
    body: Any = None
    headers: Dict[str, str] = field(default_factory=dict)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class ScriptedServer:
    """A loopback HTTP server that answers from a script, one answer per request (the last one
    repeats), and records what it was sent and when. An entry may be a function of the requests
    so far that returns the answer."""

    def __init__(self, script: List[Any]) -> None:
        self.script = list(script)
        self.requests: List[Recorded] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                owner.requests.append(Recorded(time.monotonic(), self.command, self.path, body))
                answer = owner.script.pop(0) if len(owner.script) > 1 else owner.script[0]
                if callable(answer):
                    answer = answer(owner.requests)
                payload = json.dumps(answer.body).encode() if answer.body is not None else b""
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "ScriptedServer":
        return self

    def __exit__(self, *args: Any) -> None:
        self.close()


class LossyProxy:
    """A loopback proxy in front of Tally. For the next ``lose`` posts of events (single or batch)
    it forwards the request (Tally stores the events) and then loses the answer as ``mode`` says:
    ``drop`` closes the connection without answering, ``timeout`` answers nothing until the
    client gave up, ``502`` answers 502. While ``down`` it answers 503 without forwarding."""

    def __init__(self, upstream: str, mode: str = "drop", lose: int = 0, hold_seconds: float = 1.5) -> None:
        self.upstream = upstream.replace("http://", "")
        self.mode = mode
        self.lose = lose
        self.down = False
        self.hold_seconds = hold_seconds
        self.forwarded: List[Recorded] = []
        self.answered_503 = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _proxy(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if owner.down:
                    owner.answered_503 += 1
                    self._send(503, {"Retry-After": "0"}, b'{"error":"unavailable","detail":"down"}')
                    return
                status, headers, answer = owner._forward(self.command, self.path, dict(self.headers), body)
                owner.forwarded.append(Recorded(time.monotonic(), self.command, self.path, body))
                if self.path.startswith("/api/v1/events") and owner.lose > 0:
                    owner.lose -= 1
                    if owner.mode == "502":
                        self._send(502, {}, b"bad gateway")
                        return
                    if owner.mode == "timeout":
                        time.sleep(owner.hold_seconds)
                    self.close_connection = True
                    return
                self._send(status, headers, answer)

            def _send(self, status: int, headers: Dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _proxy

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _forward(
        self, method: str, path: str, headers: Dict[str, str], body: bytes
    ) -> Tuple[int, Dict[str, str], bytes]:
        connection = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            keep = {k: v for k, v in headers.items() if k.lower() in ("x-api-key", "content-type", "accept")}
            connection.request(method, path, body=body or None, headers=keep)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def posts(self, path: str = "/api/v1/events/batch") -> List[Recorded]:
        return [r for r in self.forwarded if r.path.split("?")[0] == path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "LossyProxy":
        return self

    def __exit__(self, *args: Any) -> None:
        self.close()


def batch_answer(events: List[Dict[str, Any]]) -> Dict[str, Any]:
    """A batch answer in Tally's shape where every event was stored."""
    results = [{"index": i, "event_id": e.get("event_id"), "status": "stored"} for i, e in enumerate(events)]
    return {
        "success": True,
        "processed_count": len(events),
        "failed_count": 0,
        "failed_events": [],
        "results": results,
    }


def wait_for(predicate: Any, seconds: float, what: str) -> Any:
    """Polls ``predicate`` until it returns a truthy value, at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.05)


def run(coroutine: "Coroutine[Any, Any, T]") -> T:
    """Runs a coroutine to completion (the tests need no pytest plugin for asyncio)."""
    return asyncio.run(coroutine)

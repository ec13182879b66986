"""A real HTTP receiver of alerts for the tests (http.server in a thread on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from helpers import send_json


class Receiver:
    """An HTTP server on 127.0.0.1 recording each POSTed JSON body; ``answers`` gives the status per
    request (``{key: [500, ...]}`` consumed in order, then 200; ``always_fail``: 500 for good)."""

    def __init__(self, port: int = 0, answers: dict[str, list[int]] | None = None, always_fail: str = "") -> None:
        self.received: list[dict[str, Any]] = []
        self.answers = answers or {}
        received, answers_, always = self.received, self.answers, always_fail

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.append({**body, "_idempotency_key": self.headers.get("Idempotency-Key")})
                key = body["key"]
                queue = answers_.get(key) or []
                code = 500 if key == always else (queue.pop(0) if queue else 200)
                send_json(self, code, b'{"ok": true}' if code == 200 else b'{"error": "down"}')

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

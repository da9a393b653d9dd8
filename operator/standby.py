"""Liveness while standing by for the Lease.

kopf serves the liveness endpoint only once it runs, and it runs only on the leader; the chart probes
every replica, so a standby without this was killed every ~30 s and sat in CrashLoopBackOff, and a
fail-over could wait out a back-off of minutes. A standby is alive when its process answers: it holds
no work that could be wedged. The leader hands the port to kopf's own endpoint on winning."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        found = self.path.split("?")[0] == "/healthz"
        body = b"standing by for the lease\n" if found else b"not found\n"
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # a probe every 10 s is not news
        return


class StandbyHealth:
    """GET /healthz -> 200 on (bind, port) until stop(); the port is free again when stop() returns."""

    def __init__(self, bind: str, port: int) -> None:
        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer((bind, port), _Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="standby-health", daemon=True)

    def start(self) -> StandbyHealth:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

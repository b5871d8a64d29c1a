"""The flaky upstream of deploy/compose.yaml: healthy, then failing, over and over.

Healthy for HEALTHY_SECONDS (200), then failing for FAILING_SECONDS (500), counted
from start-up; standard library only, so it runs on a stock python image.
"""

import http.server
import os
import signal
import sys
import time

HEALTHY_SECONDS = float(os.environ.get("HEALTHY_SECONDS", "40"))
FAILING_SECONDS = float(os.environ.get("FAILING_SECONDS", "20"))
PORT = int(os.environ.get("PORT", "8000"))
STARTED = time.monotonic()


def failing_now() -> bool:
    elapsed = (time.monotonic() - STARTED) % (HEALTHY_SECONDS + FAILING_SECONDS)
    return elapsed >= HEALTHY_SECONDS


class Flaky(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, text = (500, "failing") if failing_now() else (200, "ok")
        body = f"{text}: {self.path}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    # PID 1 in its container, where SIGTERM has no default action: exit on it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    cycle = f"{HEALTHY_SECONDS:g} s healthy, {FAILING_SECONDS:g} s failing"
    print(f"flaky upstream on :{PORT}: {cycle}")
    http.server.ThreadingHTTPServer(("0.0.0.0", PORT), Flaky).serve_forever()

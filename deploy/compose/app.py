"""The app of deploy/compose.yaml: calls its upstream through the sidecar, twice a second.

Prints one line per call: the status, and for the sidecar's own answers (503 while
the circuit is open) its JSON body, so the breaker's cycle shows in the log.
"""

import os
import signal
import sys
import time
import urllib.error
import urllib.request

URL = os.environ.get("SIDECAR_URL", "http://127.0.0.1:8080/flaky/work")
INTERVAL = float(os.environ.get("INTERVAL_SECONDS", "0.5"))


def call() -> str:
    try:
        with urllib.request.urlopen(URL, timeout=5) as response:
            return f"{response.status} {response.read().decode().strip()}"
    except urllib.error.HTTPError as e:
        return f"{e.code} {e.read().decode().strip()}"
    except OSError as e:  # the sidecar is not up yet
        return f"--- {e}"


if __name__ == "__main__":
    # PID 1 in its container, where SIGTERM has no default action: exit on it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        print(time.strftime("%H:%M:%S"), call())
        time.sleep(INTERVAL)

"""Wait until a local server answers /health: `python3 benchmark/wait_healthy.py PORT [SECONDS]`."""

import sys
import time
import urllib.request

port, limit = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 300
deadline = time.time() + limit
while time.time() < deadline:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        sys.exit(0)
    except Exception:
        time.sleep(1)
sys.exit(f"server did not become healthy in {limit} s")

"""`python -m sglang.launch_server --model-path <dir|repo id|demo name> [flags]`: the HTTP server."""

from __future__ import annotations

import sys

from sglang.srt.entrypoints.http_server import launch_server
from sglang.srt.server_args import prepare_server_args

if __name__ == "__main__":
    try:
        launch_server(prepare_server_args(sys.argv[1:]))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        # Start-up problems the user can fix (model path, offline hub, bad config): one line, no trace.
        sys.exit(f"error: {type(e).__name__}: {e}")

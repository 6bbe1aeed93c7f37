"""Each benchmark measures every framework in a fresh subprocess (so neither's compile caches, threads or
memory peak leak into the other's figures); this runs one and reads the JSON line it prints last."""

from __future__ import annotations

import json
import subprocess


def worker_result(command: list[str], name: str) -> dict:
    """Runs ``command`` and returns the JSON object on its last line of stdout; a failure raises with its stderr."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} worker failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])

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


def device_peak_mib() -> float | None:
    """JAX's peak device memory in MiB, where the device reports it (not on CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


def memory_cell(result: dict) -> str:
    """A worker result's peak memory for a table: the device's where it reports one, else the process's max RSS."""
    if result.get("device_peak_mib") is not None:
        return f"{result['device_peak_mib']:.0f} (device)"
    return f"{result['peak_rss_mib']:.0f}"

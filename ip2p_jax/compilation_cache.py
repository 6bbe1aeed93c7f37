"""JAX's persistent compilation cache for the command-line programs (``sample.py``, ``evaluate.py``, ``train.py``,
``generate_data.py``): a second run with the same shapes reads its compiled programs from disk instead of compiling
them again, which is most of a small edit's time on a CPU.

Where the cache lives, first match wins: the program's ``--compilation-cache`` (``--compilation_cache`` for the
absl programs), the environment variable ``IP2P_JAX_COMPILATION_CACHE``, JAX's own ``JAX_COMPILATION_CACHE_DIR``,
then ``$XDG_CACHE_HOME/ip2p_jax/jax`` (``~/.cache/ip2p_jax/jax``). The value ``off`` turns the cache off. Entries are
keyed by the program, the JAX / XLA version and the device, so one folder serves every model and machine; deleting
it only costs compile time.
"""

from __future__ import annotations

import os
from pathlib import Path

ENVIRONMENT = "IP2P_JAX_COMPILATION_CACHE"
OFF = "off"
HELP = f"persistent compilation cache folder, or '{OFF}' (default: ${ENVIRONMENT}, else ~/.cache/ip2p_jax/jax)"
# JAX caches only programs that took at least this long to compile (its default: 1 s). An edit's programs are
# many small ones around a few large samplers, and the small ones together are seconds too; a threshold would also
# make what is cached depend on how busy the machine was.
MIN_COMPILE_SECONDS = 0.0


def default_directory() -> str:
    """The folder (or ``off``) that applies when a program is given none."""
    chosen = os.environ.get(ENVIRONMENT) or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if chosen:
        return chosen
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ip2p_jax", "jax")


def enable(directory: str | os.PathLike | None = None) -> Path | None:
    """Points JAX's persistent cache at ``directory`` (``None``: :func:`default_directory`); ``off`` disables it.
    Call before the first compilation. Returns the folder, or ``None`` when off."""
    import jax  # here, so that the programs' --help and argument errors stay quick

    chosen = str(directory) if directory is not None else default_directory()
    if chosen == OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    folder = Path(chosen).expanduser()
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return folder

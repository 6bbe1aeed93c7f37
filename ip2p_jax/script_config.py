"""One configuration system for every script: an ``ml_collections`` config file (``configs/``) of grouped settings,
overridden on the command line with ``--config.GROUP.NAME=VALUE``.

``train.py``, ``generate_data.py`` and ``evaluate_clip.py`` take ``--config`` as an absl flag; ``sample.py`` and
``evaluate.py`` keep their few everyday flags (what to edit, where to write) in argparse and hand every
``--config...`` argument to ``load_config``, which parses them with the same absl machinery. Settings shared by
several configs are declared once here (the sampler's) or beside what they configure (FoI's:
``foi.config.foi_settings``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections import config_flags


class ConfigError(ValueError):
    """A config file that cannot be read, or an override of a setting it lacks or with a value of the wrong type."""


def sampling_settings(**extra) -> ml_collections.ConfigDict:
    """The sampler's settings at the reference's defaults (``steps``: ``num_inference_steps``; the guidance scales
    s_T and s_I; the seed), plus ``extra``: the ``sample`` group of ``configs/sample.py`` and
    ``configs/evaluate.py``."""
    return ml_collections.ConfigDict(dict(steps=100, guidance_scale=7.5, image_guidance_scale=1.5, seed=0, **extra))


def unknown_setting(error: AttributeError | KeyError) -> str:
    """ml_collections' "no such field" error, raised while ``--config.*`` overrides are parsed
    (``KeyError("'x'\\nDid you mean ...")``, or an ``AttributeError`` around one), as one line that names the setting
    and, where one is close, the setting meant."""
    detail = error.args[0] if error.args else ""
    detail = detail.args[0] if isinstance(detail, KeyError) and detail.args else detail
    name, _, hint = str(detail).partition("\n")
    return f"the config has no setting {name} (an unknown --config.* override)" + (f"; {hint}" if hint else "")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The locked config of ``path`` (``FILE.py`` or ``FILE.py:VARIANT``, its ``get_config``) with ``overrides``
    (``--config.GROUP.NAME=VALUE`` arguments, parsed by ml_collections as train.py's are: a value takes the
    setting's type; a setting without a value yet (``placeholder``) takes the Python literal, else the string).

    Raises:
      ConfigError: a missing or broken file, an argument that is not ``--config.NAME=VALUE``, an unknown setting or
        a value of the wrong type; the message names it.
    """
    for argument in overrides:
        if not argument.startswith("--config.") or "=" not in argument:
            raise ConfigError(f"unexpected argument {argument!r} (settings are --config.GROUP.NAME=VALUE)")
    argv = ["script", f"--config={path}", *overrides]
    values = flags.FlagValues()
    # sys_argv: the overrides are found in this list, not in the process's own command line.
    config_flags.DEFINE_config_file("config", str(path), flag_values=values, lock_config=True, sys_argv=argv)
    try:
        values(argv)
    except flags.IllegalFlagValueError as error:  # a value of the wrong type, or a file that does not load
        raise ConfigError(str(error).split("\n")[0]) from None
    except (AttributeError, KeyError) as error:  # ml_collections' "no such field"
        raise ConfigError(f"{path}: {unknown_setting(error)}") from None
    return values.config

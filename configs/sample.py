"""``sample.py``'s settings: the sampler's and FoI's (``--config.sample.steps=50``, ``--config.foi.tau=0.3``).

    python sample.py --image in.png --instruction "make it snow" --out out.png --config.sample.steps=50

Unset FoI settings take the model folder's ``foi_config.json``, else the paper's (``FoIConfig.for_model``).
"""

import ml_collections
from ml_collections import config_dict

from ip2p_jax.foi import foi_settings
from ip2p_jax.script_config import sampling_settings


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.sample = sampling_settings(
        strength=config_dict.placeholder(float),  # IP2P's, in (0, 1]; unset: 1 (FoI's is foi.strength)
        scheduler="",  # "" = the checkpoint's own; or one of schedulers.SCHEDULERS
        karras=False,  # Karras sigmas (euler_ancestral, euler, dpmpp_2m; dpmpp_2m with them is DPM++ 2M Karras)
        guidance_rescale=0.0,  # in [0, 1]: pull the guided output's std toward the text+image branch's; 0 = off
        dtype="float32",  # the UNet's and the text encoder's compute dtype: float32 or bfloat16
        attention_backend="auto",  # the UNet's attention kernel: auto (the platform's), tiled, xla, cudnn, splash
    )
    config.foi = foi_settings()
    config.lock()
    return config

"""A tiny random IP2P model on the synthetic colour-edit stream: trains on a laptop CPU in about a minute.

python train.py --config configs/tiny.py --workdir /tmp/tiny-run
"""

import ml_collections

from ip2p_jax.tiny_configs import SMOKE_TEXT, SMOKE_UNET, SMOKE_VAE, SMOKE_WORDS
from ip2p_jax.training.config import diffusion_objective, edit_data, training_config, unet_kernels


def get_config() -> ml_collections.ConfigDict:
    config = training_config("ip2p")  # model "new": a random model from new_model; or a diffusers folder / hub id
    config.new_model = dict(unet=SMOKE_UNET, vae=SMOKE_VAE, text_encoder=SMOKE_TEXT, words=list(SMOKE_WORDS))
    config.init_from = "ip2p"  # "ip2p": an 8-channel IP2P UNet; "sd": a 4-channel SD UNet expanded to 8
    config.steps = 60
    config.log_every = 10
    # "synthetic", or a TFDS editing data set: "ip2p_original", "ip2p_manifest", "shapes_edit"
    config.data = edit_data("synthetic", resolution=32, resize_max=36, global_batch_size=8)
    config.data.shuffle_buffer = 256
    config.optim.learning_rate = 1e-3
    config.objective = diffusion_objective(conditioning_dropout=0.05)
    config.checkpoint = dict(every=30, keep=2)
    config.sample = dict(every=0, count=4, steps=20)  # edits of the first batch's images by the EMA UNet (0: never)
    unet_kernels(config)
    config.lock()
    return config

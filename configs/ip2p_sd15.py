"""The InstructPix2Pix paper's recipe from Stable Diffusion 1.5: 256 px, global batch 1024, AdamW 1e-4 constant,
EMA 0.9999, conditioning dropout 0.05.

    python train.py --config configs/ip2p_sd15.py --config.model=/path/to/stable-diffusion-v1-5 --workdir RUN
"""

import ml_collections

from ip2p_jax.training.config import diffusion_objective, edit_data, training_config, unet_kernels


def get_config() -> ml_collections.ConfigDict:
    config = training_config("ip2p", model="stable-diffusion-v1-5/stable-diffusion-v1-5")  # diffusers folder or hub id
    config.init_from = "sd"  # expand the 4-channel SD UNet to 8 channels
    config.steps = 10_000
    config.dtype = "bfloat16"
    # TFDS: "ip2p_original" (the released layout; manual_dir: its folder with seeds.json, built into TFDS the first
    # time), "ip2p_manifest", or "synthetic"
    config.data = edit_data("ip2p_original", resolution=256, resize_max=288, global_batch_size=1024)
    config.data.shuffle_buffer = 1000
    config.optim.learning_rate = 1e-4
    config.optim.accumulation = 1  # raise it when 1024 images do not fit the devices at once
    config.objective = diffusion_objective(conditioning_dropout=0.05)
    config.checkpoint = dict(every=1000, keep=3)
    config.sample = dict(every=1000, count=4, steps=50)  # edits of the first batch's images by the EMA UNet
    unet_kernels(config)
    config.lock()
    return config

"""The InstructPix2Pix paper's recipe from Stable Diffusion 1.5: 256 px, global batch 1024, AdamW 1e-4 constant,
EMA 0.9999, conditioning dropout 0.05.

    python train.py --config configs/ip2p_sd15.py --config.model=/path/to/stable-diffusion-v1-5 --workdir RUN
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # diffusers folder or hub id
    config.init_from = "sd"  # expand the 4-channel SD UNet to 8 channels
    config.data = "synthetic"  # the TFDS builders are not in this version
    config.resolution = 256
    config.global_batch_size = 1024
    config.accumulation = 1  # raise it when 1024 images do not fit the devices at once
    config.steps = 10_000
    config.learning_rate = 1e-4
    config.weight_decay = 1e-2
    config.max_grad_norm = 1.0
    config.ema_decay = 0.9999
    config.conditioning_dropout = 0.05
    config.fsdp = 1
    config.seed = 0
    config.log_every = 50
    config.save_every = 1000
    config.keep_checkpoints = 3
    config.dtype = "bfloat16"
    config.lock()
    return config

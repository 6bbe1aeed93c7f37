"""The InstructPix2Pix paper's recipe from Stable Diffusion 1.5: 256 px, global batch 1024, AdamW 1e-4 constant,
EMA 0.9999, conditioning dropout 0.05.

    python train.py --config configs/ip2p_sd15.py --config.model=/path/to/stable-diffusion-v1-5 --workdir RUN
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "ip2p"
    config.model = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # diffusers folder or hub id
    config.init_from = "sd"  # expand the 4-channel SD UNet to 8 channels
    config.data = "ip2p_original"  # TFDS: "ip2p_original" (released layout), "ip2p_manifest", or "synthetic"
    config.data_dir = ""  # TFDS data_dir ("" = TFDS's default)
    config.manual_dir = ""  # the released data set's folder (seeds.json), built into TFDS the first time
    config.split = "train"
    config.resolution = 256  # the crop
    config.resize_min = 256
    config.resize_max = 288
    config.flip_prob = 0.5
    config.shuffle_buffer = 1000
    config.global_batch_size = 1024
    config.accumulation = 1  # raise it when 1024 images do not fit the devices at once
    config.steps = 10_000
    config.learning_rate = 1e-4
    config.weight_decay = 1e-2
    config.max_grad_norm = 1.0
    config.ema_decay = 0.9999
    config.conditioning_dropout = 0.05
    # The objective (ip2p_jax/training/objective.py); the defaults are the reference's epsilon MSE.
    config.prediction_type = ""  # "" = the model's own (its scheduler config), or "epsilon" / "v_prediction"
    config.rescale_betas_zero_snr = False  # True: zero terminal SNR (Lin et al. 2024); exports trailing spacing
    config.snr_gamma = 0.0  # Min-SNR-gamma loss weighting (Hang et al. 2023; 5 in the paper); 0 = off
    config.noise_offset = 0.0  # offset noise scale (e.g. 0.05); 0 = off
    config.fsdp = 1
    config.seed = 0
    config.log_every = 50
    config.save_every = 1000
    config.keep_checkpoints = 3
    config.sample_every = 1000  # sample edits of the first batch's images with the EMA UNet (0: never)
    config.sample_count = 4
    config.sample_steps = 50
    config.dtype = "bfloat16"
    config.remat = "none"  # rematerialised blocks in the train step: "transformer", "resnet_and_transformer"
    config.attention_backend = "auto"  # the UNet's attention kernel (models/attention_kernels.py)
    config.lock()
    return config

"""A tiny random IP2P model on the synthetic colour-edit stream: trains on a laptop CPU in about a minute.

python train.py --config configs/tiny.py --workdir /tmp/tiny-run
"""

import ml_collections

from ip2p_jax.tiny_configs import SMOKE_TEXT, SMOKE_UNET, SMOKE_VAE, SMOKE_WORDS


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "ip2p"
    config.model = "new"  # a random model from new_model; or a diffusers folder / hub id
    config.new_model = dict(unet=SMOKE_UNET, vae=SMOKE_VAE, text_encoder=SMOKE_TEXT, words=list(SMOKE_WORDS))
    config.init_from = "ip2p"  # "ip2p": an 8-channel IP2P UNet; "sd": a 4-channel SD UNet expanded to 8
    config.data = "synthetic"  # or a TFDS editing data set: "ip2p_original", "ip2p_manifest", "shapes_edit"
    config.data_dir = ""  # TFDS data_dir ("" = TFDS's default)
    config.manual_dir = ""  # the source folder a TFDS data set is built from the first time
    config.split = "train"
    config.resolution = 32  # the crop
    config.resize_min = 32
    config.resize_max = 36
    config.flip_prob = 0.5
    config.shuffle_buffer = 256
    config.global_batch_size = 8
    config.accumulation = 1
    config.steps = 60
    config.learning_rate = 1e-3
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
    config.log_every = 10
    config.save_every = 30
    config.keep_checkpoints = 2
    config.sample_every = 0  # sample edits of the first batch's images with the EMA UNet (0: never)
    config.sample_count = 4
    config.sample_steps = 20
    config.dtype = "float32"
    config.remat = "none"  # rematerialised blocks in the train step: "transformer", "resnet_and_transformer"
    config.attention_backend = "auto"  # the UNet's attention kernel (models/attention_kernels.py)
    config.lock()
    return config

"""The first ShapesEdit InstructPix2Pix model (shipped as ``models/shapes-ip2p`` until the miniature lineage of
``configs/shapes_ip2p.py`` replaced it; its figures stay in docs/shapes.md for comparison): a small UNet trained from
scratch with the reference recipe on ShapesEdit's training split, over the autoencoder of ``configs/shapes_vae.py``.
The text encoder is a randomly initialised 2-layer CLIP text transformer, frozen as in IP2P (nothing trains it
here), over a tokenizer that knows ShapesEdit's words.

    python train.py --config configs/shapes_ip2p_scratch.py --config.new_model.vae=runs/shapes-vae/vae \
        --workdir runs/shapes
    python export.py --workdir runs/shapes --out models/shapes-ip2p
"""

import ml_collections

from ip2p_jax.data.shapes import WORDS


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "ip2p"
    config.model = "new"
    config.new_model = dict(
        unet=dict(
            in_channels=8,
            out_channels=4,
            block_out_channels=[48, 96, 96],
            layers_per_block=1,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=64,
            attention_head_dim=4,  # diffusers' name for the number of heads in SD 1.x configs
            norm_num_groups=16,
            sample_size=16,
        ),
        vae="models/shapes-ip2p/vae",  # a trained autoencoder folder (export.py of a shapes_vae run)
        text_encoder=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        words=list(WORDS),
    )
    config.init_from = "ip2p"
    config.data = "shapes_edit"
    config.data_dir = ""  # TFDS data_dir ("" = TFDS's default)
    config.manual_dir = ""
    config.split = "train"
    config.resolution = 64  # the crop
    config.resize_min = 64
    config.resize_max = 72
    config.flip_prob = 0.5
    config.shuffle_buffer = 2000
    config.global_batch_size = 32
    config.accumulation = 1
    config.steps = 5000
    config.learning_rate = 3e-4
    config.weight_decay = 1e-2
    config.max_grad_norm = 1.0
    config.ema_decay = 0.9999
    config.conditioning_dropout = 0.05
    config.fsdp = 1
    config.seed = 0
    config.log_every = 50
    config.save_every = 500
    config.keep_checkpoints = 2
    config.sample_every = 1000  # sample edits of the first batch's images with the EMA UNet (0: never)
    config.sample_count = 6
    config.sample_steps = 50
    config.dtype = "float32"
    config.remat = "none"  # rematerialised blocks in the train step: "transformer", "resnet_and_transformer"
    config.attention_backend = "auto"  # the UNet's attention kernel (models/attention_kernels.py)
    config.lock()
    return config

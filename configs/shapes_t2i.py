"""The miniature lineage's text-to-image model (``models/shapes-t2i``): a small latent diffusion model trained from
scratch on the endless stream of captioned ShapesEdit scenes, over the shipped autoencoder and the frozen text tower
of the lineage's CLIP (``configs/shapes_clip.py``), with 10 % caption dropout and the grounding objective
(``ip2p_jax/training/grounding.py``) on its 16 x 16 and 8 x 8 cross-attention layers.

    python train.py --config configs/shapes_t2i.py --workdir runs/shapes-t2i
    python export.py --workdir runs/shapes-t2i --out models/shapes-t2i

``--config.grounding.token_weight=0 --config.grounding.pixel_weight=0`` trains without grounding. Stage 2b continued
that run's export on varied captions (docs/shapes.md):

    python train.py --config configs/shapes_t2i.py --config.model=models/shapes-t2i --config.data.caption_style=varied \
        --config.steps=1000 --workdir runs/shapes-t2i-varied

The variant ``regrown`` (issue 31; the folder shipped in ``models/shapes-t2i`` since then) regrows the stage over the
CLIP trained with hard negatives: the stage-2b UNet (copied into the run's initial model: its picture prior is kept,
its cross-attention relearns the new encoder's words), captions in the instructions' grammar (``instructions``),
v-prediction and zero terminal SNR (what stage 3c taught). The stage-2b folder is ``models/shapes-t2i`` of commit
e2fad12:

    git archive e2fad12 models/shapes-t2i | tar -x -C runs/stage-2b
    python train.py --config configs/shapes_t2i.py:regrown --workdir runs/shapes-t2i-regrown \
        --config.new_model.unet=runs/stage-2b/models/shapes-t2i/unet --config.new_model.text_encoder=models/shapes-clip
    python export.py --workdir runs/shapes-t2i-regrown --out models/shapes-t2i
"""

import ml_collections

from ip2p_jax.training.config import diffusion_objective, training_config, unet_kernels


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    if variant not in ("", "regrown"):
        raise ValueError(f"unknown variant {variant!r} of configs/shapes_t2i.py (none, or regrown)")
    config = training_config("text_to_image")
    # Tuples rather than lists, so that the command line can override them.
    architecture = dict(
        in_channels=4,
        out_channels=4,
        block_out_channels=(48, 96, 96),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,  # the CLIP text tower's width
        attention_head_dim=4,  # diffusers' name for the number of heads in SD 1.x configs
        norm_num_groups=16,
        sample_size=16,
    )
    # regrown: a trained 4-channel UNet folder (the stage-2b one, above)
    config.new_model = dict(
        unet="runs/stage-2b/models/shapes-t2i/unet" if variant == "regrown" else architecture,
        vae="models/shapes-ip2p/vae",  # the shipped autoencoder (64 x 64 -> 16 x 16 x 4)
        text_encoder="models/shapes-clip",  # a CLIP folder: its text tower and tokenizer
    )
    config.steps = 4000
    # caption_style: "full", "varied" or "instructions" (ip2p_jax/data/captioned_scenes.py)
    config.data = dict(name="shapes_captions", caption_style="full", resolution=64, global_batch_size=32)
    config.optim.learning_rate = 3e-4
    config.objective = diffusion_objective(caption_dropout=0.1)
    config.grounding = dict(token_weight=1.0, pixel_weight=1.0, sizes=((16, 16), (8, 8)))
    # generated pictures and held-out word localisation of the EMA UNet every `every` steps (0: never)
    config.sample = dict(every=500, count=6, steps=50, guidance_scale=5.0)
    config.eval = dict(
        name="word_localisation",  # training/evaluators.py
        count=64,  # held-out scenes for word localisation
        timesteps=(300, 500, 700),
        map_size=(16, 16),
        gamma=3,  # FoI's mask extraction (FoIConfig.gamma, tau) as models/shapes-ip2p/foi_config.json sets it
        tau=0.5,
    )
    if variant == "regrown":
        config.steps = 2000
        config.data.caption_style = "instructions"
        config.objective.prediction_type = "v_prediction"
        config.objective.rescale_betas_zero_snr = True
    unet_kernels(config)
    config.lock()
    return config

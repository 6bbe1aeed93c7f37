"""Samplers: the core every sampler is built from (``core``) and the InstructPix2Pix sampler (``ip2p``).

FoI's sampler is ``ip2p_jax.foi.sampler``; text-to-image and Prompt-to-Prompt's are
``ip2p_jax.generation.text_to_image``.
"""

from ip2p_jax.sampling.ip2p import (
    AttentionRecording,
    IP2PStep,
    SamplerInputs,
    SamplerSettings,
    make_ip2p_sampler,
    start_latents,
)

__all__ = [
    "AttentionRecording",
    "IP2PStep",
    "SamplerInputs",
    "SamplerSettings",
    "make_ip2p_sampler",
    "start_latents",
]

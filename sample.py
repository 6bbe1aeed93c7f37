"""Instruction-based image editing from the command line (InstructPix2Pix, Focus on Your Instruction).

Not built yet: the sampler, pipeline and this CLI are the subject of the next issue (schedulers, dual guidance,
pipeline and sample.py). Until then, the models and checkpoint loading are in ``ip2p_jax.models`` and
``ip2p_jax.weights``.
"""

import sys

if __name__ == "__main__":
    sys.exit(
        "sample.py: editing is not implemented yet (see the sampler and pipeline issue); "
        "the models and loaders are in ip2p_jax.models and ip2p_jax.weights"
    )

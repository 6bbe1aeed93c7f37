"""Training InstructPix2Pix on a device mesh.

Not built yet: the train step, data pipeline and checkpoints are the subject of the training issue.
"""

import sys

if __name__ == "__main__":
    sys.exit("train.py: training is not implemented yet (see the training issue)")

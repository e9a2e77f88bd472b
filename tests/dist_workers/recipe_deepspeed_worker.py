"""Runs `badam-hf ARGS...` in each process of a torchrun launch, for a recipe with
`training.deepspeed=configs/deepspeed_zero3.json` (CPU, gloo, DS_ACCELERATOR=cpu).

On a GPU, accelerate initialises DeepSpeed's communication before the model is built; with use_cpu it does
not, and `zero.Init` (which builds the model partitioned) would size the batch for one process. Test only.
"""

from __future__ import annotations

import os
import sys

import deepspeed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_common import finish  # noqa: E402

from badam_hf.cli import main  # noqa: E402

if __name__ == "__main__":
    deepspeed.init_distributed(dist_backend="gloo")
    if main(sys.argv[1:]) != 0:
        sys.exit(1)
    finish()

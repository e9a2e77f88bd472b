"""Runs `badam-hf ARGS...` in each process of a torchrun launch, for a recipe with
`training.deepspeed=configs/deepspeed_zero3.json` (CPU, gloo, DS_ACCELERATOR=cpu).

On a GPU, accelerate initialises DeepSpeed's communication before the model is built; with use_cpu it does
not, and `zero.Init` (which builds the model partitioned) would size the batch for one process. Test only.
"""

from __future__ import annotations

import sys

import deepspeed

from dist_common import finish

from badam_hf.tools.cli import main

if __name__ == "__main__":
    deepspeed.init_distributed(dist_backend="gloo")
    if main(sys.argv[1:]) != 0:
        sys.exit(1)
    finish()

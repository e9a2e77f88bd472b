"""Runs `badam-hf ARGS...` in each process of an `accelerate launch --config_file configs/accelerate_fsdp2.yaml`,
with accelerate's FSDP switched on for CPU (test only): the shipped FSDP2 config and recipe, end to end.

Usage: accelerate launch --config_file configs/accelerate_fsdp2.yaml --num_processes 2 recipe_fsdp_worker.py train ...
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_common import enable_accelerate_fsdp_on_cpu, finish  # noqa: E402

enable_accelerate_fsdp_on_cpu()

from badam_hf.cli import main  # noqa: E402

if __name__ == "__main__":
    if main(sys.argv[1:]) != 0:
        sys.exit(1)
    finish()

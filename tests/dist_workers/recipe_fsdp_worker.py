"""Runs `badam-hf ARGS...` in each process of an `accelerate launch --config_file configs/accelerate_fsdp2.yaml`,
with accelerate's FSDP switched on for CPU (test only): the shipped FSDP2 config and recipe, end to end.

Usage: accelerate launch --config_file configs/accelerate_fsdp2.yaml --num_processes 2 recipe_fsdp_worker.py train ...
"""

from __future__ import annotations

import sys

from dist_common import enable_accelerate_fsdp_on_cpu, finish

enable_accelerate_fsdp_on_cpu()

from badam_hf.tools.cli import main  # noqa: E402

if __name__ == "__main__":
    if main(sys.argv[1:]) != 0:
        sys.exit(1)
    finish()

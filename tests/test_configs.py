"""The shipped accelerate configs load with accelerate's own reader and name real recipes in their commands."""

import re
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

from badam_hf.recipes import shipped_recipes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPECTED = {"accelerate_single_gpu.yaml": ("NO", 1), "accelerate_ddp.yaml": ("MULTI_GPU", 2)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_documents_its_command(name):
    path = CONFIGS / name
    cfg = ClusterConfig.from_yaml_file(str(path))
    kind, procs = EXPECTED[name]
    assert str(cfg.distributed_type).endswith(kind) and cfg.num_processes == procs
    assert cfg.mixed_precision == "bf16"
    header = path.read_text().split("compute_environment")[0]
    assert "Command:" in header
    for recipe in re.findall(r"train (\S+)", header):
        assert recipe in shipped_recipes(), recipe

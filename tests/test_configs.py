"""The shipped accelerate configs load with accelerate's own reader and name real recipes in their commands."""

import re
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

from badam_hf.recipes import shipped_recipes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPECTED = {  # distributed type, processes, mixed precision
    "accelerate_single_gpu.yaml": ("NO", 1, "bf16"),
    "accelerate_ddp.yaml": ("MULTI_GPU", 2, "bf16"),
    # bf16 weights under FSDP2 train with mixed precision off (badam_hf refuses accelerate's partial upcast).
    "accelerate_fsdp2.yaml": ("FSDP", 4, "no"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_documents_its_command(name):
    path = CONFIGS / name
    cfg = ClusterConfig.from_yaml_file(str(path))
    kind, procs, precision = EXPECTED[name]
    assert str(cfg.distributed_type).endswith(kind) and cfg.num_processes == procs
    assert cfg.mixed_precision == precision
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    header = path.read_text().split("compute_environment")[0]
    assert "Command:" in header
    assert re.findall(r"train (\S+)", header)
    for recipe in re.findall(r"train (\S+)", header):
        assert recipe in shipped_recipes(), recipe

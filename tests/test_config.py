"""BAdamConfig: parsing of --optim_args, and clear errors for every bad value."""

import pytest
import torch

import badam_hf  # noqa: F401  (registers --optim badam with transformers)
from badam_hf.core.config import BAdamConfig, BAdamConfigError, PartitionConfig, ScheduleConfig


def test_defaults():
    c = BAdamConfig.from_optim_args(None)
    assert c == BAdamConfig()
    assert c.partition.granularity == "layer" and c.partition.target_modules is None
    assert c.partition.always_active is None
    assert c.schedule == ScheduleConfig(switch_every=100, switch_mode="random", start_block=None, seed=42)
    assert c.inner_optimizer_cls is torch.optim.AdamW
    assert c.truncate_backward is True
    assert BAdamConfig.from_optim_args("") == c


def test_typed_parsing():
    c = BAdamConfig.from_optim_args(
        "switch_every=50,switch_mode=ascending,include_embedding=true,always_active=classifier+pooler,"
        "start_block=3,seed=7,inner_optimizer=sgd"
    )
    s = c.schedule
    assert s.switch_every == 50 and isinstance(s.switch_every, int)
    assert s.switch_mode == "ascending"
    assert s.start_block == 3 and s.seed == 7
    p = c.partition
    assert p.include_embedding is True and p.include_lm_head is False
    assert p.always_active == ["classifier", "pooler"]
    assert c.inner_optimizer == "sgd" and c.inner_optimizer_cls is torch.optim.SGD


def test_more_values():
    c = BAdamConfig.from_optim_args(
        " granularity=matrix, include_lm_head=False, always_active=none, start_block=None,"
        "truncate_backward=0,inner_optimizer=torch.optim.Adagrad"
    )
    assert c.partition.granularity == "matrix"
    assert c.partition.include_lm_head is False
    assert c.partition.always_active == []  # explicit "none": no always-active module
    assert c.schedule.start_block is None
    assert c.truncate_backward is False
    assert c.inner_optimizer_cls is torch.optim.Adagrad
    assert BAdamConfig.from_optim_args("include_embedding=YES").partition.include_embedding is True


def test_target_modules():
    assert BAdamConfig.from_optim_args("", ["model.layers.0", "model.layers.1"]).partition.target_modules == [
        "model.layers.0",
        "model.layers.1",
    ]
    assert BAdamConfig.from_optim_args("", "model.layers.0, model.layers.1").partition.target_modules == [
        "model.layers.0",
        "model.layers.1",
    ]
    # A regex passed as optim_target_modules keeps its "+" (the list separator of optim_args).
    regex = r"model\.layers\.\d+\.mlp\..*"
    assert BAdamConfig.from_optim_args("", regex).partition.target_modules == [regex]
    assert BAdamConfig.from_optim_args("target_modules=a+b").partition.target_modules == ["a", "b"]
    with pytest.raises(BAdamConfigError, match="target_modules is given twice"):
        BAdamConfig.from_optim_args("target_modules=a", ["b"])
    with pytest.raises(BAdamConfigError, match="target_modules is empty"):
        PartitionConfig(target_modules=[])


def test_unknown_key_lists_valid_keys():
    with pytest.raises(BAdamConfigError) as e:
        BAdamConfig.from_optim_args("switch_every=10,swtich_mode=random")
    msg = str(e.value)
    assert "'swtich_mode'" in msg and "valid keys" in msg
    for key in ("switch_every", "switch_mode", "granularity", "target_modules", "include_embedding",
                "include_lm_head", "always_active", "start_block", "seed", "inner_optimizer", "truncate_backward"):
        assert key in msg.split("valid keys")[1], key


@pytest.mark.parametrize(
    "optim_args, pattern",
    [
        ("switch_every=abc", r"switch_every='abc' in optim_args is not valid; expected an integer"),
        ("switch_every=1.5", r"switch_every='1.5' .*expected an integer"),
        ("seed=x", r"seed='x' .*expected an integer"),
        ("start_block=first", r"start_block='first' .*expected an integer"),
        ("switch_every=0", r"switch_every=0 is not valid; .*integer >= 1"),
        ("switch_every=-5", r"switch_every=-5 is not valid"),
        ("start_block=-1", r"start_block=-1 is not valid"),
        ("switch_mode=bogus", r"switch_mode='bogus' is not valid; choose one of 'random', 'ascending', 'descending', "
                              r"'fixed'"),
        ("granularity=block", r"granularity='block' is not valid; choose one of 'layer', 'attn_mlp', 'matrix'"),
        ("include_embedding=maybe", r"include_embedding='maybe' in optim_args is not valid; expected true/false"),
        ("truncate_backward=2", r"truncate_backward='2' .*expected true/false"),
        ("inner_optimizer=lion", r"inner_optimizer='lion' is not valid; choose one of 'adamw', 'adam', 'sgd'"),
        ("inner_optimizer=torch.optim.Nope", r"inner_optimizer='torch.optim.Nope' cannot be imported"),
        ("inner_optimizer=torch.nn.Linear", r"inner_optimizer='torch.nn.Linear' is not a torch.optim.Optimizer"),
        ("switch_every", r"cannot read 'switch_every' in optim_args .*key=value pairs"),
        ("switch_every=5,ascending", r"cannot read 'ascending'"),
        ("always_active=a=b", r"cannot read 'always_active=a=b'"),
        ("seed=1,seed=2", r"key 'seed' appears twice"),
    ],
)
def test_bad_values(optim_args, pattern):
    with pytest.raises(BAdamConfigError, match=pattern):
        BAdamConfig.from_optim_args(optim_args)


def test_error_is_value_error():
    # Callers that catch ValueError (argument parsers) see BAdam's errors too.
    assert issubclass(BAdamConfigError, ValueError)


def test_dataclasses_validate_python_values():
    with pytest.raises(BAdamConfigError, match="switch_every=True"):
        ScheduleConfig(switch_every=True)
    with pytest.raises(BAdamConfigError, match="include_lm_head must be true or false"):
        PartitionConfig(include_lm_head="yes")
    with pytest.raises(BAdamConfigError, match="seed='1'"):
        ScheduleConfig(seed="1")
    c = BAdamConfig(partition={"granularity": "attn_mlp"}, schedule={"switch_every": 3}, inner_optimizer=torch.optim.Adam)
    assert c.partition.granularity == "attn_mlp" and c.schedule.switch_every == 3
    assert c.inner_optimizer_cls is torch.optim.Adam
    with pytest.raises(BAdamConfigError, match="switch_mode='x'"):
        BAdamConfig(schedule={"switch_mode": "x"})
    with pytest.raises(BAdamConfigError, match="unknown key"):
        BAdamConfig.from_flat({"switch_evry": 3})


def test_training_arguments_reject_bad_optim_args(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(BAdamConfigError, match=r"switch_mode='bogus'.*'random', 'ascending', 'descending', 'fixed'"):
        TrainingArguments(output_dir=str(tmp_path), optim="badam", optim_args="switch_mode=bogus", report_to="none")
    with pytest.raises(BAdamConfigError, match="unknown key"):
        TrainingArguments(output_dir=str(tmp_path), optim="badam", optim_args="foo=1", report_to="none")


def test_training_arguments_accept_good_optim_args(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), optim="badam", optim_args="switch_every=5,switch_mode=descending",
        optim_target_modules="model.layers.0,model.layers.1", report_to="none", use_cpu=True,
    )
    assert args.optim == "badam"
    c = BAdamConfig.from_optim_args(args.optim_args, args.optim_target_modules)
    assert c.schedule.switch_every == 5 and c.partition.target_modules == ["model.layers.0", "model.layers.1"]
    # Other optimizers' optim_args are not BAdam's business.
    TrainingArguments(output_dir=str(tmp_path), optim="adamw_torch", optim_args="foo=1", report_to="none")


def test_include_flags_with_explicit_target_modules_are_an_error():
    with pytest.raises(BAdamConfigError, match="do not combine with target_modules"):
        BAdamConfig.from_optim_args("include_embedding=true", ["model.layers.0"])


def test_trl_config_accepts_badam_and_checks_its_args(tmp_path):
    import trl
    cfg = trl.SFTConfig(output_dir=str(tmp_path), optim="badam", optim_args="switch_every=5", report_to="none", use_cpu=True)
    assert cfg.optim == "badam"
    with pytest.raises(BAdamConfigError, match="switch_every=0"):
        trl.SFTConfig(output_dir=str(tmp_path), optim="badam", optim_args="switch_every=0", report_to="none", use_cpu=True)

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


# --- one source of truth: the fields ---------------------------------------------------------------------

import dataclasses  # noqa: E402
import re  # noqa: E402
import typing  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

from badam_hf.core import config as config_module  # noqa: E402
from badam_hf.core.config import LisaConfig, RatioConfig, parse_value  # noqa: E402


def test_flat_keys_are_unique_across_sections_and_cover_every_field():
    keys = [key for key, *_ in BAdamConfig.flat_settings()]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    sections = BAdamConfig.sections()
    assert set(sections) == {"partition", "schedule", "ratio", "lisa", "inactive"}
    expected = {f.name for cls in sections.values() for f in dataclasses.fields(cls)}
    expected |= {f.name for f in dataclasses.fields(BAdamConfig) if f.name not in sections}
    assert set(keys) == expected and set(BAdamConfig.flat_fields()) == expected
    # The types are the annotations themselves, not their text.
    assert BAdamConfig.flat_fields()["switch_every"] == ("schedule", int | None)
    assert BAdamConfig.flat_fields()["truncate_backward"] == (None, bool)
    assert BAdamConfig.flat_fields()["granularity"] == ("partition", typing.Literal["layer", "attn_mlp", "matrix"])


def test_a_key_defined_in_two_sections_is_refused():
    @dataclass
    class Clash:
        seed: int = field(default=0, metadata={"help": "a second seed"})

    @dataclass
    class Clashing(BAdamConfig):
        clash: Clash = field(default_factory=Clash, metadata={"help": "see Clash"})

    with pytest.raises(TypeError, match="flat key 'seed' is defined in schedule and in clash"):
        Clashing.flat_fields()


def test_a_new_key_is_one_field():
    # A field with a type and help is a flat key at once: parsed from strings, type-checked, in the docs.
    @dataclass
    class Extended(BAdamConfig):
        skip_bad_steps: bool = field(default=False, metadata={"help": "skip steps whose gradient is not finite"})
        max_skips: int | None = field(default=None, metadata={"help": "give up after this many skips"})

    c = Extended.from_flat({"skip_bad_steps": "yes", "max_skips": "3", "switch_every": "7"}, source="optim_args")
    assert c.skip_bad_steps is True and c.max_skips == 3 and c.schedule.switch_every == 7
    assert Extended.from_flat({"max_skips": "none"}).max_skips is None
    with pytest.raises(BAdamConfigError, match=r"skip_bad_steps='maybe' in optim_args is not valid; expected true/fa"):
        Extended.from_flat({"skip_bad_steps": "maybe"}, source="optim_args")
    with pytest.raises(BAdamConfigError, match=r"max_skips=2.5 is not valid; max_skips must be an integer or none"):
        Extended(max_skips=2.5)


def test_choices_come_from_the_literal_annotations():
    hints = config_module.field_types
    assert config_module.GRANULARITIES == typing.get_args(hints(PartitionConfig)["granularity"])
    assert config_module.SWITCH_MODES == typing.get_args(hints(ScheduleConfig)["switch_mode"])
    assert config_module.MODES == typing.get_args(hints(BAdamConfig)["mode"])
    assert config_module.MASK_MODES == typing.get_args(hints(RatioConfig)["mask_mode"])
    with pytest.raises(BAdamConfigError, match=r"granularity='Layer' is not valid; choose one of 'layer', 'attn_mlp'"):
        PartitionConfig(granularity="Layer")


@pytest.mark.parametrize("raw, hint, value", [
    ("True", bool, True), ("no", bool, False), ("1", bool, True),
    ("12", int, 12), ("none", int | None, None), ("5", int | None, 5),
    ("0.5", float, 0.5), ("1e-3", float, 1e-3),
    ("sgd", typing.Literal["sgd", "adam"], "sgd"),
    ("a+b", list[str], ["a", "b"]), ("none", list[str] | None, []), ("1+2", list[int], [1, 2]),
    ("x+y", tuple[str, ...], ["x", "y"]),
    ("adamw", str | type, "adamw"),
])
def test_strings_are_parsed_by_the_annotation(raw, hint, value):
    assert parse_value("k", raw, hint, "optim_args") == value


@pytest.mark.parametrize("raw, hint, expected", [
    ("maybe", bool, "true/false"), ("1.5", int, "an integer"), ("x", int | None, "an integer or none"),
    ("lots", float, "a number"), ("1+x", list[int], "a list"),
])
def test_unparsable_strings_name_the_key_and_the_type(raw, hint, expected):
    with pytest.raises(BAdamConfigError, match=re.escape(f"k={raw!r} in src is not valid; expected {expected}")):
        parse_value("k", raw, hint, "src")


def test_python_values_are_checked_against_the_annotations():
    with pytest.raises(BAdamConfigError, match=r"lisa_layers=2.0 is not valid; lisa_layers must be an integer"):
        LisaConfig(lisa_layers=2.0)
    with pytest.raises(BAdamConfigError, match=r"update_ratio=True is not valid; update_ratio must be a number"):
        RatioConfig(update_ratio=True)
    with pytest.raises(BAdamConfigError, match=r"schedule=3 is not valid; schedule must be a ScheduleConfig or a dict"):
        BAdamConfig(schedule=3)
    r = RatioConfig(update_ratio=1)
    assert r.update_ratio == 1.0 and isinstance(r.update_ratio, float)
    assert PartitionConfig(always_active=("a", "b")).always_active == ["a", "b"]


def test_the_callers_objects_are_not_mutated():
    sched = ScheduleConfig(switch_mode="random")
    lisa = BAdamConfig(mode="lisa", schedule=sched)
    assert lisa.schedule.switch_every == 20
    assert sched.switch_every is None  # the default went into a copy
    # The same object serves a second config with another mode and so another default.
    assert BAdamConfig(schedule=sched).schedule.switch_every == 100
    given = ScheduleConfig(switch_every=7)
    assert BAdamConfig(schedule=given).schedule is given  # nothing to fill in: kept as it is
    partition = {"granularity": "matrix"}
    assert BAdamConfig(partition=partition).partition == PartitionConfig(granularity="matrix")
    assert partition == {"granularity": "matrix"}


def test_help_is_in_the_field_metadata_and_in_the_docstring():
    for cls in (BAdamConfig, *BAdamConfig.sections().values()):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            assert f"{f.name}: {config_module.help_text(f)}" in cls.__doc__

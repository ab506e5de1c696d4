"""The shared config pieces: the safe-name type, dotted keys, and errors that name the bad key."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
from pydantic import Field

from jobs.config_base import (
    ConfigError,
    SafeName,
    StrictModel,
    apply_overrides,
    get_dotted,
    read_yaml_mapping,
    set_dotted,
    validate,
)


class Named(StrictModel):
    name: SafeName


@pytest.mark.parametrize("name", ["run-1", "probe_k10", "a.b"])
def test_safe_names_pass(name):
    assert Named(name=name).name == name


@pytest.mark.parametrize("name", ["", "a/b", "a\\b", "a b", ".hidden", ".."])
def test_unsafe_names_fail_naming_the_value(name):
    with pytest.raises(ConfigError) as err:
        validate(Named, {"name": name})
    assert f"name: name {name!r} must be a non-empty folder name without slashes or spaces" in str(err.value)


def test_every_named_config_uses_the_safe_name_type():
    from jobs.config import JobConfig
    from jobs.ensemble import EnsembleJobConfig
    from jobs.language_comparison import ComparisonConfig as LanguageComparison
    from jobs.simclr_comparison import ComparisonConfig as SimclrComparison
    from jobs.sweep_config import SweepConfig

    for model in (JobConfig, EnsembleJobConfig, LanguageComparison, SimclrComparison, SweepConfig):
        assert model.model_fields["name"].metadata == Named.model_fields["name"].metadata, model


def test_strict_models_refuse_unknown_keys_and_bad_assignments():
    with pytest.raises(ConfigError, match=r"unknown key 'nam' \(did you mean 'name'\?\); valid keys here: name"):
        validate(Named, {"nam": "x"})
    named = Named(name="ok")
    with pytest.raises(ValueError, match="folder name"):
        named.name = "a/b"


def test_dotted_keys_set_get_and_override():
    data: dict = {"train": {"lr": 0.1}, "seed": 0}
    set_dotted(data, "method.hidden", 8)
    assert get_dotted(data, "method.hidden") == 8
    assert apply_overrides(data, ["train.lr=0.5", "data.test_limit=null", "name=x y"]) is data
    assert data["train"]["lr"] == 0.5 and data["data"] == {"test_limit": None} and data["name"] == "x y"
    with pytest.raises(ConfigError, match=r"^'seed' is a value, not a section$"):
        set_dotted(data, "seed.x", 1)


def test_read_yaml_mapping_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^sweep config .*nope\.yaml does not exist$"):
        read_yaml_mapping(tmp_path / "nope.yaml", "sweep config")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"top level must be a mapping"):
        read_yaml_mapping(tmp_path / "list.yaml")


class Member(StrictModel):
    spec: str
    kind: Literal["member"] = "member"


class Other(StrictModel):
    kind: Literal["other"] = "other"
    size: int = 1


class Root(StrictModel):
    members: list[Member] = Field(default_factory=list)
    space: dict[str, Member] = Field(default_factory=dict)
    choice: Annotated[Member | Other, Field(discriminator="kind")] | None = None
    flag: bool | Literal["auto"] = "auto"


@pytest.mark.parametrize(("data", "line"), [
    ({"members": [{"spec": "a"}, {"spek": "b"}]},
     "unknown key 'members[1].spek' (did you mean 'members[1].spec'?); valid keys here: kind, spec"),
    ({"members": [{"spec": 3}]}, "members[0].spec: Input should be a valid string (got 3)"),
    ({"space": {"train.lr": {"spec": "a", "lowx": 1}}},
     "space key 'train.lr': unknown key 'lowx'; valid keys here: kind, spec"),
    ({"space": {"train.lr": {}}}, "space key 'train.lr' (spec): Field required"),
    ({"choice": {"kind": "other", "sise": 2}},
     "unknown key 'choice.sise' (did you mean 'choice.size'?); valid keys here: kind, size"),
    ({"flag": "x"}, "flag: Input should be a valid boolean"),
])
def test_errors_name_lists_dicts_and_union_members_readably(data, line):
    with pytest.raises(ConfigError) as err:
        validate(Root, data, "invalid root")
    message = str(err.value)
    assert message.startswith("invalid root:\n  ") and line in message, message

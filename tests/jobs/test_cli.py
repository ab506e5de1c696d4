"""The shared job command line: parsing, config errors as a clear exit, Ray only after validation."""

from __future__ import annotations

import pytest
import yaml
from pydantic import BaseModel

from jobs.cli import exit_on_error, job_parser, start_job
from jobs.config import load_config


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: t\nmethod: {name: probe}\n")
    return path


def _start(argv, **kwargs):
    """``start_job`` of a train-like job; returns (args, config, addresses it connected to)."""
    connected = []
    args, cfg = start_job(job_parser("python -m jobs.test", "a test job"), argv,
                          lambda a: load_config(a.config, a.overrides), connect=connected.append, **kwargs)
    return args, cfg, connected


def test_config_overrides_and_address_reach_the_job(config):
    args, cfg, connected = _start(["--config", str(config), "train.lr=0.05", "--address", "ray://head:10001"])
    assert cfg.train.lr == 0.05 and args.overrides == ["train.lr=0.05"]
    assert connected == ["ray://head:10001"]
    _, _, connected = _start(["--config", str(config)])
    assert connected == [None]  # init_ray then reads RAY_ADDRESS, or starts a local instance


@pytest.mark.parametrize(("override", "match"), [
    ("train.lr", r"override 'train\.lr' must look like dotted\.key=value"),
    ("name.x=1", r"override 'name\.x=1': 'name' is a value, not a section"),
    ("train.epochs=-1", r"train\.epochs: .*greater than 0 \(got -1\)"),
])
def test_a_bad_override_exits_naming_it_before_ray(config, override, match):
    with pytest.raises(SystemExit, match=r"(?s)^error: .*" + match) as exit_:
        _start(["--config", str(config), override])
    assert "Traceback" not in str(exit_.value)


def test_an_unknown_key_exits_naming_it_and_the_valid_keys(config):
    with pytest.raises(SystemExit) as exit_:
        _start(["--config", str(config), "train.lrr=0.1"])
    message = str(exit_.value)
    assert "unknown key 'train.lrr' (did you mean 'train.lr'?)" in message
    assert "valid keys here: batch_size, " in message and ", lr, " in message


def test_a_yaml_syntax_error_or_a_missing_file_is_a_clear_exit(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nmethod: {name: probe\n")
    with pytest.raises(SystemExit, match=rf"^error: {bad}: not valid YAML"):
        _start(["--config", str(bad)])
    with pytest.raises(SystemExit, match=r"^error: config file .*missing\.yaml does not exist"):
        _start(["--config", str(tmp_path / "missing.yaml")])


def test_raw_pydantic_and_yaml_errors_become_messages():
    class Section(BaseModel):
        epochs: int

    with pytest.raises(SystemExit, match=r"(?s)^error: invalid config:\n  epochs: .*integer \(got 'x'\)"), \
            exit_on_error():
        Section.model_validate({"epochs": "x"})
    with pytest.raises(SystemExit, match=r"^error: not valid YAML"), exit_on_error():
        yaml.safe_load("a: [1")
    with pytest.raises(KeyError), exit_on_error():  # not a config error: a real bug keeps its traceback
        raise KeyError("x")


def test_a_job_without_config_or_ray_gets_neither_flag():
    parser = job_parser("python -m jobs.export", None, config_help=None, address=False)
    parser.add_argument("--out", required=True)
    assert vars(parser.parse_args(["--out", "o"])) == {"out": "o"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "o", "--address", "auto"])


@pytest.mark.parametrize("job", ["train", "ensemble", "sweep", "zeroshot_eval", "language_comparison",
                                 "simclr_comparison"])
def test_every_ray_job_exits_on_a_missing_config_before_ray(job, tmp_path, monkeypatch, capsys):
    import importlib

    module = importlib.import_module(f"jobs.{job}")

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for an invalid config")

    monkeypatch.setattr(module, "init_ray", no_ray)
    with pytest.raises(SystemExit, match=r"^error: .*missing\.yaml does not exist"):
        module.main(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit) as help_:
        module.main(["--help"])
    assert help_.value.code == 0 and f"python -m jobs.{job}" in capsys.readouterr().out

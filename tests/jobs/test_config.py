from pathlib import Path

import pytest
import yaml

from jobs.config import ConfigError, apply_overrides, load_config, parse_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "jobs" / "configs").rglob("*.yaml"))
SWEEP_DIR = "sweeps"
NOT_JOB_CONFIGS = {SWEEP_DIR, "ensemble"}  # ensemble/: jobs.ensemble configs, see tests/jobs/test_ensemble_job.py


# A multi-run file (top-level ``runs:``, e.g. language/comparison.yaml) is validated by its own job's tests.
JOB_CONFIGS = [p for p in CONFIGS
               if not NOT_JOB_CONFIGS & set(p.parts) and "runs" not in (yaml.safe_load(p.read_text()) or {})]


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_job_config_validates(path):
    cfg = load_config(path)
    assert cfg.name and cfg.method.name


def _base():
    return {"name": "t", "method": {"name": "probe"}}


def test_unknown_key_names_itself_and_the_valid_keys():
    with pytest.raises(ConfigError) as err:
        parse_config({**_base(), "train": {"lrr": 0.1}})
    message = str(err.value)
    assert "unknown key 'train.lrr'" in message and "did you mean 'train.lr'" in message
    assert "batch_size" in message and "epochs" in message


def test_unknown_method_key_lists_the_methods_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'method.hiden'.*hidden"):
        parse_config({"name": "t", "method": {"name": "probe", "hiden": 3}})


def test_unknown_method_lists_valid_methods():
    with pytest.raises(ConfigError, match=r"unknown method 'magic'.*probe"):
        parse_config({"name": "t", "method": {"name": "magic"}})


def test_bad_value_names_the_key_and_value():
    with pytest.raises(ConfigError, match=r"train.epochs.*got -1"):
        parse_config({**_base(), "train": {"epochs": -1}})
    with pytest.raises(ConfigError, match="unknown backbone spec"):
        parse_config({**_base(), "backbone": {"spec": "resnet"}})


def test_dotted_overrides_parse_like_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: t\nmethod: {name: probe}\n")
    cfg = load_config(path, ["train.lr=0.05", "scaling.num_workers=3", "data.test_limit=null", "method.depth=2"])
    assert cfg.train.lr == 0.05 and cfg.scaling.num_workers == 3 and cfg.data.test_limit is None
    assert cfg.method.depth == 2
    with pytest.raises(ConfigError, match=r"dotted\.key=value"):
        apply_overrides({}, ["novalue"])


def test_config_dump_round_trips():
    cfg = parse_config({**_base(), "train": {"epochs": 3}})
    assert parse_config(cfg.dump()).dump() == cfg.dump()


def test_feature_store_defaults_to_the_storage_path():
    cfg = parse_config({"name": "r", "method": {"name": "probe"}, "run": {"storage_path": "s3://bucket/polyclip"}})
    assert cfg.run.feature_store == "s3://bucket/polyclip/features"
    local = parse_config({"name": "r", "method": {"name": "probe"}, "run": {"output_dir": "/data/runs"}})
    assert local.run.feature_store == "/data/runs/r/ray/features"
    explicit = parse_config({"name": "r", "method": {"name": "probe"}, "run": {"feature_store": "/nfs/features"}})
    assert explicit.run.feature_store == "/nfs/features"
    with pytest.raises(ConfigError, match=r"run\.cache_dir is now run\.feature_store.*'/nfs/features'"):
        parse_config({"name": "r", "method": {"name": "probe"}, "run": {"cache_dir": "/nfs/features"}})


def test_relative_outputs_of_a_submitted_job_outlive_its_working_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = parse_config({"name": "r", "method": {"name": "probe"}})
    assert cfg.run.output_dir == str(tmp_path / "polyclip" / "runs")
    assert cfg.run.storage_path == str(tmp_path / "polyclip" / "runs" / "r" / "ray")


def test_precision_and_loggers_validate():
    with pytest.raises(ConfigError, match=r"train\.precision"):
        parse_config({"name": "r", "method": {"name": "probe"}, "train": {"precision": "fp8"}})
    with pytest.raises(ConfigError, match=r"run\.loggers"):
        parse_config({"name": "r", "method": {"name": "probe"}, "run": {"loggers": ["comet"]}})

"""``jobs.benchmarks.common``: the harness every benchmark script shares."""

from __future__ import annotations

import json
import shlex
import socket

import numpy as np
import pytest

from jobs.benchmarks import common
from polyclip.data.datasets import load_dataset
from polyclip.features.cache import FeatureCache


def test_command_line_names_the_module_and_quotes_the_arguments():
    command = common.command_line(["--seeds", "0", "1", "--name", "a b"], module="jobs.benchmarks.x")
    assert command == "python -m jobs.benchmarks.x --seeds 0 1 --name 'a b'"
    assert shlex.split(command)[3:] == ["--seeds", "0", "1", "--name", "a b"]


def test_announce_prints_the_command_first_and_returns_it(capsys):
    command = common.announce(["--k", "4"], "jobs.benchmarks.x")
    assert command == "python -m jobs.benchmarks.x --k 4"
    assert capsys.readouterr().out == f"command: {command}\n"


def test_out_dir_puts_a_name_under_the_root_and_keeps_a_path(tmp_path):
    assert common.out_dir("bench", root=tmp_path) == tmp_path / "bench"
    assert (tmp_path / "bench").is_dir()
    given = tmp_path / "elsewhere" / "run"
    assert common.out_dir(given, root=tmp_path / "unused") == given and given.is_dir()


def test_free_port_can_be_bound():
    port = common.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_write_results_writes_json_and_markdown(tmp_path):
    rows = [{"model": "a", "acc": 0.5}, {"model": "b", "acc": 0.25}]
    md = common.write_results(tmp_path, "python -m jobs.benchmarks.x", rows, title="X vs Y",
                              blocks=["Some notes.", rows, "## More", [{"k": 1}]], extra={"seeds": [0]})
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["command"] == "python -m jobs.benchmarks.x" and report["rows"] == rows
    assert report["seeds"] == [0] and len(report["loadavg"]) == 3
    assert (tmp_path / "results.md").read_text() == md
    assert md.startswith("# X vs Y\n\n`python -m jobs.benchmarks.x`\n\nSome notes.\n| model | acc |")
    assert "| a | 0.5000 |" in md and md.index("## More") < md.index("| k |")


def test_write_results_without_blocks_is_the_rows_table(tmp_path):
    md = common.write_results(tmp_path, "cmd", [{"a": 1.0}], title="T", floatfmt=".1f", stem="other")
    assert md.endswith("| a |\n|---|\n| 1.0 |\n") and (tmp_path / "other.json").is_file()


def test_pool_features_in_process_fills_the_entry_the_ray_path_reads(tmp_path):
    """One key: what the in-process path encodes, ``jobs.features.cached_features`` finds (a hit needs no Ray)."""
    from jobs.features import cached_features

    dataset = load_dataset("synthetic", synthetic_size=40, seed=0)
    cache = FeatureCache(tmp_path / "features")
    indices = np.arange(6)
    first = common.pool_features(cache, dataset, "efficientnet_lite:0", 32, "train", indices, use_ray=False)
    again = common.pool_features(cache, dataset, "efficientnet_lite:0", 32, "train", indices, use_ray=False)
    via_ray_job = cached_features(cache, "efficientnet_lite:0", 32, dataset.fingerprint, dataset.spec, "train",
                                  indices, dataset.train.images[indices])
    assert first.shape == (6, 1280)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, via_ray_job)


def test_pool_features_refuses_a_missing_pool(tmp_path):
    dataset = load_dataset("synthetic", synthetic_size=40, seed=0)
    dataset.test = None
    with pytest.raises(ValueError, match="no test pool"):
        common.pool_features(FeatureCache(tmp_path), dataset, "efficientnet_lite:0", 32, "test", np.arange(2))

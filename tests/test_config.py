"""Typed configs: unknown keys and wrong types name the key; the CLI exits 2 with one line, no traceback."""
from __future__ import annotations

import time

import pytest

from tasks.config import ConfigError, PipelineConfig, load_pipeline, to_dict
from tests.conftest import run_cli, write_pipeline


def test_defaults_roundtrip():
    cfg = load_pipeline({"curate": {"input": "/data"}})
    assert isinstance(cfg, PipelineConfig)
    assert cfg.pretrain.method == "mocov2"
    assert to_dict(cfg)["curate"]["input"] == "/data"


@pytest.mark.parametrize("raw, overrides, needle", [
    ({"curate": {"input": "x", "bogus": 1}}, [], "curate.bogus: unknown key"),
    ({"curate": {"input": "x"}}, ["pretrain.epochs=many"], "pretrain.epochs: expected int"),
    ({"curate": {"input": "x"}}, ["pretrain.lr=[1]"], "pretrain.lr: expected float"),
    ({"curate": {"input": "x"}}, ["pretrain.method=simclr9"], "pretrain.method: unknown method 'simclr9'"),
    ({"curate": {}}, [], "curate.input: required"),
    ({"curate": {"input": "x"}, "nosuch": {}}, [], "nosuch: unknown key"),
    ({"curate": {"input": "x"}}, ["pretrain.batch_size=63"], "pretrain.batch_size: must be divisible"),
    ({"curate": {"input": "x"}}, ["pretrain.decay_norm_and_bias=maybe"], "pretrain.decay_norm_and_bias: 'maybe'"),
])
def test_bad_config_names_the_key(raw, overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_pipeline(raw, overrides)
    assert needle in str(e.value)


def test_override_types_are_yaml():
    cfg = load_pipeline({"curate": {"input": "x"}}, ["pretrain.lr=0.5", "pretrain.epochs=3",
                                                      "pretrain.method_kwargs={queue_size: 8}"])
    assert cfg.pretrain.lr == 0.5 and cfg.pretrain.epochs == 3 and cfg.pretrain.method_kwargs == {"queue_size": 8}


@pytest.mark.parametrize("args, needle", [
    (["--set", "curate.bogus=1"], "curate.bogus: unknown key"),
    (["--set", "pretrain.epochs=abc"], "pretrain.epochs: expected int"),
    (["--set", "curate.input=/no/such/folder"], "curate.input: '/no/such/folder' does not exist"),
    (["--set", "pretrain.method=nope"], "pretrain.method: unknown method"),
    (["--force", "nostage"], "--force nostage: unknown stage"),
])
def test_cli_bad_config_exits_2_with_one_line(tmp_path, args, needle):
    pipe = write_pipeline(tmp_path / "p.yaml")
    t0 = time.time()
    code, out, err = run_cli("run", str(pipe), "--storage", str(tmp_path / "s"), *args)
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert needle in lines[0] and "Traceback" not in err
    assert time.time() - t0 < 30  # no Ray, no torch on this path


def test_cli_missing_pipeline_file(tmp_path):
    code, _, err = run_cli("run", str(tmp_path / "missing.yaml"))
    assert code == 2 and "not found" in err and "Traceback" not in err


def test_unreachable_tracking_server_fails_fast(tmp_path):
    from tests.conftest import free_port

    pipe = write_pipeline(tmp_path / "p.yaml")
    t0 = time.time()
    code, _, err = run_cli("run", str(pipe), "--storage", str(tmp_path / "s"),
                           "--tracking-uri", f"http://127.0.0.1:{free_port()}")
    assert code == 2 and "tracking server unreachable" in err and "Traceback" not in err
    assert time.time() - t0 < 30


def test_help_is_quick():
    for args in (["--help"], ["run", "--help"], ["stage", "--help"]):
        t0 = time.time()
        code, out, _ = run_cli(*args)
        assert code == 0 and "usage" in out
        assert time.time() - t0 < 10


def test_augment_fields_match_the_augment_dataclass():
    import dataclasses

    from tasks.config import AUGMENT_FIELDS
    from tasks.data.transforms import Augment

    assert AUGMENT_FIELDS == {f.name for f in dataclasses.fields(Augment)} - {"size"}


def test_unknown_augment_option_is_a_config_error():
    with pytest.raises(ConfigError, match=r"pretrain\.augment\.blurr"):
        load_pipeline({"curate": {"input": "x"}}, ["pretrain.augment={scale: [0.5, 1.0], blurr: 0.3}"])

"""The configuration: shipped files validate, overrides apply, bad keys and values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedamole.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_every_shipped_config_validates():
    assert {p.stem for p in CONFIGS} >= {
        "default",
        "paper",
        "natural_instructions",
        "dolly_dir0.1",
        "dolly_dir1.0",
        "snli_dir0.1",
        "snli_dir1.0",
    }
    for path in CONFIGS:
        assert isinstance(load_config(path), Config), path


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(
        CONFIGS[0],
        [
            "federation.rounds=7",
            "hmole.target_modules=[q_proj,k_proj]",
            f"data.path={tmp_path}",
            "privacy.enabled=true",
        ],
    )
    assert cfg.federation.rounds == 7
    assert cfg.hmole.target_modules == ["q_proj", "k_proj"]
    assert cfg.data.path == tmp_path and cfg.privacy.enabled


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("federation.roundz=2", "federation.roundz: unknown key"),
        ("federation.rounds=zero", "federation.rounds"),
        ("hmole.rank=0", "hmole.rank"),
        ("data.train_frac=0.9", "sum to 1"),
        ("rounds", "expected key=value"),
    ],
)
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_yaml_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("federation: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["seed=3", "federation.num_clients=6"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg

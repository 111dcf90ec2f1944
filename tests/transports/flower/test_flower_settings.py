"""[tool.flwr.app.config] -> the fedamole Config: unset keys, typed values, config-file lookup."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from fedamole.config import Config, ConfigError
from fedamole.transports.flower.settings import config_overrides, load_settings

BASE = {"config-file": "", "reply-timeout": 30, "join-timeout": 60.0}


def test_empty_values_mean_unset_and_values_keep_their_types(tmp_path):
    run_config = {
        **BASE,
        "federation.rounds": 2,
        "optim.lr": 1e-05,
        "privacy.enabled": True,
        "model.name": "tiny-random-llama",
        "hmole.target_modules": "[q_proj, v_proj]",
        "seed": "",
    }
    settings = load_settings(run_config, app_dir=tmp_path)
    cfg = settings.config
    assert (cfg.federation.rounds, cfg.optim.lr, cfg.privacy.enabled) == (2, 1e-05, True)
    assert cfg.model.name == "tiny-random-llama"
    assert cfg.hmole.target_modules == ["q_proj", "v_proj"]
    assert cfg.seed == 42  # "" kept the default
    assert (settings.reply_timeout, settings.join_timeout) == (30.0, 60.0)
    assert all(
        not item.startswith(("config-file", "reply-timeout", "seed"))
        for item in config_overrides(run_config)
    )


def test_config_file_is_read_from_the_app_folder_and_overrides_win(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "small.yaml").write_text("federation:\n  rounds: 5\n  local_steps: 3\n")
    run_config = {**BASE, "config-file": "configs/small.yaml", "federation.rounds": 2}
    cfg = load_settings(run_config, app_dir=tmp_path).config
    assert (cfg.federation.rounds, cfg.federation.local_steps) == (2, 3)


def test_unknown_keys_and_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="federation.roundz"):
        load_settings({**BASE, "federation.roundz": 2}, app_dir=tmp_path)
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_settings({**BASE, "config-file": "nope.yaml"}, app_dir=tmp_path)


def test_declared_app_config_means_the_fedamole_defaults(tmp_path):
    """Every key pyproject.toml declares is a fedamole key, and its default changes nothing."""
    pyproject = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())
    run_config = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])
    settings = load_settings(run_config, app_dir=tmp_path)
    assert settings.config == Config()
    assert settings.reply_timeout > 0 and settings.join_timeout > 0

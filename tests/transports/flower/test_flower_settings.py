"""[tool.flwr.app.config] -> the fedamole Config: unset keys, typed values, config-file lookup."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from fedamole.config import Config, ConfigError
from fedamole.transports.flower.settings import CONFIG_DIR_ENV, config_overrides, load_settings

BASE = {
    "config-file": "",
    "reply-timeout": 30,
    "join-timeout": 60.0,
    "self-declared-partitions": True,
}


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


def test_declared_app_config_means_the_fedamole_defaults_and_asks_for_a_roster(tmp_path):
    """Every key pyproject.toml declares is a fedamole key, and its default changes nothing, except
    that a deployment without a roster refuses to start unless self-declared partitions are
    chosen explicitly."""
    pyproject = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())
    run_config = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])
    with pytest.raises(ConfigError, match="any registered node could claim another's client"):
        load_settings(run_config, app_dir=tmp_path)
    settings = load_settings(run_config | {"self-declared-partitions": True}, app_dir=tmp_path)
    assert settings.config == Config() and settings.roster is None
    assert settings.reply_timeout > 0 and settings.join_timeout > 0


SECRET = "sk-other-organisation-0123456789"


@pytest.fixture
def secret_file(tmp_path_factory) -> Path:
    """A file of the SuperLink's machine outside every allowed folder, whose keys would be
    echoed as unknown settings if it were read as a config."""
    path = tmp_path_factory.mktemp("secrets") / "api_keys.yaml"
    path.write_text(f'"{SECRET}": ["*"]\n')
    return path


def test_config_file_outside_the_app_is_refused_without_reading_it(tmp_path, secret_file):
    app = tmp_path / "app"
    app.mkdir()
    (app / "link.yaml").symlink_to(secret_file)
    for name in (str(secret_file), "../" * 12 + str(secret_file)[1:], "link.yaml"):
        for key in ("config-file", "roster-file"):
            run_config = {**BASE, "self-declared-partitions": key == "config-file", key: name}
            with pytest.raises(ConfigError, match="outside the app folder") as err:
                load_settings(run_config, app_dir=app)
            assert SECRET not in str(err.value) and key in str(err.value)


def test_the_operator_directory_is_allowed_besides_the_app(tmp_path, monkeypatch):
    operator = tmp_path / "operator"
    operator.mkdir()
    (operator / "small.yaml").write_text("federation:\n  rounds: 4\n")
    run_config = {**BASE, "config-file": str(operator / "small.yaml")}
    with pytest.raises(ConfigError, match="outside the app folder"):
        load_settings(run_config, app_dir=tmp_path / "app")
    monkeypatch.setenv(CONFIG_DIR_ENV, str(operator))
    assert load_settings(run_config, app_dir=tmp_path / "app").config.federation.rounds == 4


def test_roster_file_names_one_node_per_client(tmp_path):
    roster = tmp_path / "roster.yaml"
    run_config = {
        **BASE,
        "self-declared-partitions": False,
        "roster-file": "roster.yaml",
        "federation.num_clients": 2,
    }
    roster.write_text("8412933671094321: 0  # hospital A\n77: 1\n")
    assert load_settings(run_config, app_dir=tmp_path).roster == {8412933671094321: 0, 77: 1}
    for text, message in [
        ("8412933671094321: 0\n77: 0\n", r"names clients \[0, 0\]"),
        ("8412933671094321: 0\n", r"exactly one node for each of 0 \.\. 1"),
        ("node-0: 0\n77: 1\n", "SuperNode id -> client id"),
        ("- 1\n", "SuperNode id -> client id"),
    ]:
        roster.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_settings(run_config, app_dir=tmp_path)
    with pytest.raises(ConfigError, match="not both"):
        load_settings(run_config | {"self-declared-partitions": True}, app_dir=tmp_path)

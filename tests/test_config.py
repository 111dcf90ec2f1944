"""The configuration: shipped files validate, overrides apply, bad keys and values are named."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

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
        ("baselines.prompt_tuning_init=text", "baselines.prompt_tuning_init_text"),
        ("baselines.fdlora_outer_momentum=1", "baselines.fdlora_outer_momentum"),
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


def test_num_groups_checked_against_num_clients_for_the_groups_partition():
    with pytest.raises(ConfigError, match=r"data\.num_groups=5 exceeds federation\.num_clients=4"):
        load_config(None, ["data.partition=groups", "data.num_groups=5"])
    ok = load_config(None, ["data.partition=groups", "data.num_groups=4"])
    assert ok.data.num_groups == ok.federation.num_clients == 4
    # other partitions ignore num_groups, so one client with the default of 2 is fine
    assert load_config(None, ["federation.num_clients=1"]).data.num_groups == 2
    with pytest.raises(ConfigError, match="data.num_groups"):
        load_config(None, ["data.num_groups=0"])


def test_own_data_settings_parse():
    cfg = load_config(
        None,
        [
            "data.source=hf",
            "data.hf_id=org/set",
            "data.hf_split=validation",
            "data.format=messages",
            "data.columns.label=topic",
        ],
    )
    assert (cfg.data.hf_id, cfg.data.hf_split, cfg.data.format) == (
        "org/set",
        "validation",
        "messages",
    )
    assert cfg.data.columns.label == "topic" and cfg.data.columns.instruction is None
    with pytest.raises(ConfigError, match="data.columns.question: unknown key"):
        load_config(None, ["data.columns.question=q"])
    with pytest.raises(ConfigError, match="data.format"):
        load_config(None, ["data.format=sharegpt"])


def test_a_bare_no_for_mixed_precision_is_the_string_no():
    assert load_config(None, ["optim.mixed_precision=no"]).optim.mixed_precision == "no"


def test_the_configuration_reference_is_what_config_accepts():
    """docs/configuration.md is generated from Config: a key added, renamed or re-described in
    the code without `make docs` fails here."""
    from fedamole.config_reference import reference_markdown

    written = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert written == reference_markdown(), "docs/configuration.md is stale: run `make docs`"
    for section, field in Config.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            for key in model.model_fields:
                assert f"`{section}.{key}" in written, f"{section}.{key}"

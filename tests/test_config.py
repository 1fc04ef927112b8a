"""Config loading, overrides and the error messages a user sees."""

from pathlib import Path

import pytest

from fairedge.common.config import ConfigError, RunConfig, build_config, config_hash, load_config, to_toml

DEFAULT = Path(__file__).parents[1] / "simulations" / "configs" / "default.toml"


def test_default_config_file_loads_and_meets_the_demo_bar():
    cfg = load_config(DEFAULT)
    assert cfg.federation.num_clients >= 6 and cfg.federation.rounds >= 10
    assert cfg.aggregation.method == "fedit"


def test_overrides_parse_toml_literals():
    cfg = load_config(
        DEFAULT,
        [
            "federation.rounds=3",
            "lora.target_modules=['q_proj']",
            "compression.enabled=true",
            "federation.lr=0.01",
            "name=my-run",
        ],
    )
    assert cfg.federation.rounds == 3
    assert cfg.lora.target_modules == ["q_proj"]
    assert cfg.compression.enabled is True
    assert cfg.federation.lr == 0.01
    assert cfg.name == "my-run"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("federation.rounds=0", "federation.rounds = 0: Input should be greater than or equal to 1"),
        ("federation.rondz=3", "unknown config field 'federation.rondz'"),
        ("aggregation.method=fedsgd", "aggregation.method = 'fedsgd': unknown method; allowed: "),
        ("compression.density=1.5", "compression.density = 1.5"),
        ("data.partition=iid", "data.partition = 'iid'"),
        ("federation.device=tpu", "federation.device = 'tpu'"),
        ("model.hidden_size=65", "model.hidden_size=65 must be divisible by model.num_heads=4"),
        ("federation.min_train_nodes=9", "federation.min_train_nodes=9 exceeds federation.num_clients=6"),
        ("data.task=text", "data.path is required for task 'text'"),
        ("name=bad name", "name = 'bad name'"),
    ],
)
def test_bad_values_name_field_value_and_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT, [override])
    assert expected in str(err.value)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["federation.rounds"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\nrounds = 2")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_text_task_needs_text_model_and_existing_paths(tmp_path):
    table = tmp_path / "x.csv"
    table.write_text("text,label\na,0\nb,1\n")
    with pytest.raises(ConfigError, match="does not fit"):
        build_config({"data": {"task": "text", "path": str(table)}})
    with pytest.raises(ConfigError, match="data.path='/no/such.csv' does not exist"):
        build_config(
            {"data": {"task": "text", "path": "/no/such.csv"}, "model": {"kind": "hf-text", "path": str(tmp_path)}}
        )
    with pytest.raises(ConfigError, match="is not a directory"):
        build_config({"data": {"task": "text", "path": str(table)}, "model": {"kind": "hf-text", "path": str(table)}})


def test_resolved_toml_round_trips_and_hash_is_stable(tmp_path):
    cfg = load_config(DEFAULT, ["federation.rounds=4"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    again = load_config(path)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(RunConfig()) != config_hash(cfg)

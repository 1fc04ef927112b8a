"""Config loading, overrides and the error messages a user sees."""

import subprocess
import sys
from pathlib import Path

import pytest
from platformdirs import user_cache_dir

from fairedge.common.config import (
    AGGREGATION_METHODS,
    CACHE_ENV,
    ConfigError,
    RunConfig,
    build_config,
    config_hash,
    load_config,
    to_toml,
)

DEFAULT = Path(__file__).parents[1] / "simulations" / "configs" / "digits.toml"


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


def test_text_task_needs_text_model_and_client_paths_are_checked_where_read(tmp_path):
    table = tmp_path / "x.csv"
    table.write_text("text,label\na,0\nb,1\n")
    with pytest.raises(ConfigError, match="does not fit"):
        build_config({"data": {"task": "text", "path": str(table)}})
    with pytest.raises(ConfigError, match="model.path is required"):
        build_config({"data": {"task": "text", "path": str(table)}, "model": {"kind": "hf-text"}})
    # a server validates configs whose data and model live on the clients: no file-system checks here
    remote = {"data": {"task": "text", "path": "/on/the/client.csv"}, "model": {"kind": "hf-text", "path": "/m"}}
    assert build_config(remote).data.path == "/on/the/client.csv"
    # the loader, on the machine that reads the file, names the field
    from fairedge.common.data.user_data import load_text_table

    with pytest.raises(FileNotFoundError, match="data.path '/on/the/client.csv' does not exist"):
        load_text_table("/on/the/client.csv")


def test_aggregation_methods_are_the_registry_without_importing_it():
    from fairedge.common.aggregation import AGGREGATORS

    assert set(AGGREGATION_METHODS) == set(AGGREGATORS) and len(AGGREGATION_METHODS) == len(AGGREGATORS)


def test_config_imports_neither_torch_nor_the_aggregation_rules():
    code = (
        "import sys, fairedge.common.config as c; c.load_config(None, ['aggregation.method=lora_fair']); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft', 'flwr') "
        "or m.startswith('fairedge.common.aggregation')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_model_cache_defaults_to_the_user_cache_folder_env_and_field_override(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    default = RunConfig().model.cache_path()
    assert default == Path(user_cache_dir("fairedge")) and default.is_absolute()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert RunConfig().model.cache_path() == tmp_path / "env"
    field = load_config(None, [f"model.cache_dir='{tmp_path / 'field'}'"])
    assert field.model.cache_path() == tmp_path / "field"  # the config field wins over the environment
    # the default is resolved at use, never stored: the TOML and the hash are the same on every machine
    assert "cache_dir" not in to_toml(RunConfig())
    hashed = config_hash(RunConfig())
    monkeypatch.delenv(CACHE_ENV)
    assert config_hash(RunConfig()) == hashed == config_hash({})
    assert config_hash(field) != hashed


def test_resolved_toml_round_trips_and_hash_is_stable(tmp_path):
    cfg = load_config(DEFAULT, ["federation.rounds=4"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    again = load_config(path)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(RunConfig()) != config_hash(cfg)

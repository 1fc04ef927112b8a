"""From config to data and model: partitions cover the data; bad LoRA targets fail clearly."""

import pytest

from fairedge.common.config import build_config
from fairedge.common.task import client_partition, load_task, lora_model


@pytest.fixture
def small_cfg(tmp_path):
    return build_config(
        {
            "data": {"samples_per_domain": 40},
            "model": {"cache_dir": str(tmp_path), "pretrain_epochs": 1},
            "federation": {"num_clients": 6},
        }
    )


def test_client_partitions_are_disjoint_single_domain_and_cover_the_train_split(small_cfg):
    parts = [client_partition(small_cfg, k) for k in range(6)]
    assert sum(len(p) for p in parts) == len(load_task(small_cfg).train)
    assert [p.domain.unique().tolist() for p in parts] == [[k] for k in range(6)]
    with pytest.raises(ValueError, match="partition-id 6 outside"):
        client_partition(small_cfg, 6)


def test_lora_targets_that_match_nothing_name_the_available_layers(small_cfg):
    bad = small_cfg.model_copy(update={"lora": small_cfg.lora.model_copy(update={"target_modules": ["query"]})})
    with pytest.raises(ValueError, match=r"match no layer.*\['fc1', 'fc2', 'k_proj', 'o_proj', 'q_proj', 'v_proj'\]"):
        lora_model(bad)
    model = lora_model(small_cfg)
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)

import dataclasses

import pytest

from jaxopt_serve.models import (
    CNNConfig,
    MLPConfig,
    NNXMLPConfig,
    TransformerConfig,
    config_from_dict,
    registered_configs,
)

CONFIGS = [
    MLPConfig(features=(32, 16), num_classes=4, input_shape=(5, 3)),
    CNNConfig(channels=(4, 8), convs_per_stage=2, pool="avg", in_channels=3),
    TransformerConfig(vocab_size=30, num_layers=3, num_heads=2, hidden_size=8, pooling="mean"),
    NNXMLPConfig(features=(7,), num_classes=2),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_config_round_trips_through_dict(config):
    data = config.to_dict()
    assert data["name"] == config.name
    assert config_from_dict(data) == config


def test_every_reference_config_is_registered():
    assert {"mlp", "cnn", "transformer", "nnx_mlp"} <= set(registered_configs())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: MLPConfig(features=()), "MLPConfig.features must not be empty"),
        (lambda: MLPConfig(features=(8, 0)), "MLPConfig.features must hold positive ints"),
        (lambda: CNNConfig(pool="median"), "CNNConfig.pool must be 'max' or 'avg'"),
        (lambda: CNNConfig(dropout_rate=1.5), "CNNConfig.dropout_rate must be in [0, 1)"),
        (lambda: TransformerConfig(hidden_size=10, num_heads=4), "hidden_size (10) must be divisible by num_heads (4)"),
        (lambda: TransformerConfig(seq_len=200, max_len=128), "seq_len (200) exceeds max_len (128)"),
    ],
)
def test_invalid_config_names_the_field(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        make()


def test_config_from_dict_rejects_unknown_names_and_fields():
    with pytest.raises(ValueError, match="unknown model config 'resnet'"):
        config_from_dict({"name": "resnet", "fields": {}})
    with pytest.raises(ValueError, match=r"has no fields \['width'\]"):
        config_from_dict({"name": "mlp", "fields": {"width": 3}})


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MLPConfig().num_classes = 3  # type: ignore[misc]

import os

import jax
import numpy as np
import pytest

from jaxopt_serve.artifact import Artifact, ArtifactError, load_artifact, save_artifact
from jaxopt_serve.models import CNNConfig, MLPConfig, NNXMLPConfig, TransformerConfig, init_variables, predict_fn


def _assert_bit_exact(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_trained_cnn_round_trip_is_bit_exact(tmp_path, trained_cnn, digits):
    artifact, _ = trained_cnn
    path = tmp_path / "cnn.jxs"
    size = save_artifact(path, artifact)
    assert size == os.path.getsize(path)
    loaded = load_artifact(path)
    assert loaded.config == artifact.config
    assert loaded.input_shape == (8, 8, 1)
    assert loaded.metadata == artifact.metadata
    _assert_bit_exact(loaded.variables, artifact.variables)
    x = digits.x_test[:16]
    np.testing.assert_array_equal(
        predict_fn(loaded.config)(loaded.variables, x), predict_fn(artifact.config)(artifact.variables, x)
    )


@pytest.mark.parametrize(
    "config",
    [TransformerConfig(vocab_size=20, hidden_size=8, num_heads=2, mlp_dim=8), NNXMLPConfig(features=(5,))],
    ids=lambda c: c.name,
)
def test_other_models_round_trip(tmp_path, config):
    variables = init_variables(config, 1)
    save_artifact(tmp_path / "m.jxs", Artifact(config, variables, config.example_shape()))
    loaded = load_artifact(tmp_path / "m.jxs")
    _assert_bit_exact(loaded.variables, variables)


@pytest.fixture
def saved(tmp_path):
    config = MLPConfig(features=(8,), num_classes=3)
    path = tmp_path / "mlp.jxs"
    save_artifact(path, Artifact(config, init_variables(config, 0), (8, 8, 1), {"note": "x"}))
    return path


@pytest.mark.parametrize("keep", [0, 10, 100, -1])
def test_truncated_artifact_says_truncated(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(ArtifactError, match="is truncated"):
        load_artifact(saved)


@pytest.mark.parametrize("where", ["header", "payload", "digest"])
def test_altered_byte_fails_the_checksum(saved, where):
    data = bytearray(saved.read_bytes())
    header_len = int.from_bytes(data[8:16], "little")
    position = {"header": 16 + header_len - 3, "payload": 16 + header_len + 40, "digest": len(data) - 1}[where]
    data[position] ^= 0x01
    saved.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="is corrupted"):
        load_artifact(saved)


def test_appended_bytes_are_corruption(saved):
    saved.write_bytes(saved.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="1 unexpected bytes"):
        load_artifact(saved)


def test_not_an_artifact(tmp_path):
    path = tmp_path / "other.bin"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ArtifactError, match="not a jaxopt_serve artifact"):
        load_artifact(path)


def test_variables_that_do_not_fit_the_model_name_the_path(tmp_path):
    config = MLPConfig(features=(8,), num_classes=3)
    variables = init_variables(config, 0)
    variables["params"]["dense_0"]["kernel"] = np.zeros((64, 9), np.float32)
    save_artifact(tmp_path / "bad.jxs", Artifact(config, variables, (8, 8, 1)))
    with pytest.raises(ArtifactError, match=r"variable \['params'\]\['dense_0'\]\['kernel'\] is float32\[64, 9\]"):
        load_artifact(tmp_path / "bad.jxs")
    del variables["params"]["classifier"]
    save_artifact(tmp_path / "bad.jxs", Artifact(config, variables, (8, 8, 1)))
    with pytest.raises(ArtifactError, match=r"missing \[\"\['params'\]\['classifier'\]\['bias'\]\""):
        load_artifact(tmp_path / "bad.jxs")


def test_failed_write_keeps_the_old_artifact_and_leaves_no_temp_file(saved):
    before = saved.read_bytes()
    config = MLPConfig(features=(8,), num_classes=3)
    bad = Artifact(config, {"params": {"w": object()}}, (8, 8, 1))  # cannot be serialized
    with pytest.raises(Exception):  # noqa: B017 - any failure of the write will do; the point is what it leaves
        save_artifact(saved, bad)
    assert saved.read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]


def test_no_pickle_in_the_file(saved):
    data = saved.read_bytes()
    assert b"\x80\x04\x95" not in data and b"\x80\x05\x95" not in data  # pickle protocol 4/5 frames
    assert data.startswith(b"JXSERVE\0")


def test_cnn_on_another_image_size_keeps_its_input_shape(tmp_path):
    config = CNNConfig(channels=(4,), hidden=0, in_channels=3)
    save_artifact(tmp_path / "c.jxs", Artifact(config, init_variables(config, 0, (32, 32, 3)), (32, 32, 3)))
    assert load_artifact(tmp_path / "c.jxs").input_shape == (32, 32, 3)

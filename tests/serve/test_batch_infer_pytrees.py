"""Batch inference for a model with a dict input and tuple outputs: .npz in, .npz out, resumable."""

import numpy as np
import pytest

from jaxopt_serve.engine import InferenceEngine
from jaxopt_serve.serve import open_input, run_batch_inference
from tiny_pytree_models import dict_inputs, dict_model


@pytest.fixture(scope="module")
def engine():
    return InferenceEngine(dict_model(), max_batch=16)


@pytest.fixture
def files(tmp_path):
    x = dict_inputs(50, seed=3)
    np.savez(tmp_path / "in.npz", **x)
    (tmp_path / "model.bin").write_bytes(b"stands for the model artifact")
    return tmp_path, x


def test_npz_members_form_the_dict_input_and_each_output_leaf_is_written(files, engine):
    tmp_path, x = files
    out = tmp_path / "out.npz"
    summary = run_batch_inference(
        engine, tmp_path / "in.npz", out, artifact_path=tmp_path / "model.bin", chunk_size=16, progress=False
    )
    assert summary["rows"] == 50 and summary["chunks"] == 4
    logits, ids = engine(x)
    with np.load(out) as npz:
        assert sorted(npz.files) == ["0", "1"]
        np.testing.assert_allclose(npz["0"], logits, rtol=1e-5, atol=1e-6)
        assert npz["1"].dtype == np.int32
        np.testing.assert_array_equal(npz["1"], ids)
    assert isinstance(open_input(out, "1"), np.memmap)  # stored uncompressed: memory-mappable again
    assert not (tmp_path / "out.npz.partial").exists() and not (tmp_path / "out.npz.state.json").exists()

    # explicit keys give the same dict input; an .npy output cannot hold two arrays
    explicit = tmp_path / "explicit.npz"
    run_batch_inference(
        engine.__call__,
        tmp_path / "in.npz",
        explicit,
        artifact_path=tmp_path / "model.bin",
        key=["mask", "x"],
        chunk_size=16,
        progress=False,
    )
    assert explicit.read_bytes() == out.read_bytes()
    with pytest.raises(ValueError, match=r"returns 2 output arrays \['0', '1'\]; write them to an \.npz output"):
        run_batch_inference(
            engine,
            tmp_path / "in.npz",
            tmp_path / "out.npy",
            artifact_path=tmp_path / "model.bin",
            chunk_size=16,
            progress=False,
        )


def test_an_interrupted_npz_run_resumes_byte_identical(files, engine):
    tmp_path, _ = files
    reference = tmp_path / "reference.npz"
    run_batch_inference(
        engine, tmp_path / "in.npz", reference, artifact_path=tmp_path / "model.bin", chunk_size=8, progress=False
    )

    class Crash(Exception):
        pass

    def crash_after_three(done, total):
        if done == 3:
            raise Crash

    out = tmp_path / "resumed.npz"
    with pytest.raises(Crash):
        run_batch_inference(
            engine,
            tmp_path / "in.npz",
            out,
            artifact_path=tmp_path / "model.bin",
            chunk_size=8,
            progress=False,
            on_chunk=crash_after_three,
        )
    assert not out.exists() and (tmp_path / "resumed.npz.partial").is_dir()
    summary = run_batch_inference(
        engine, tmp_path / "in.npz", out, artifact_path=tmp_path / "model.bin", chunk_size=8, progress=False
    )
    assert summary["resumed_at_chunk"] == 3
    assert out.read_bytes() == reference.read_bytes()

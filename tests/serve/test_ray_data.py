"""Ray Data batch inference: byte-identical to run_batch_inference over the same rows, also when an actor dies."""

import os
import signal

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from jaxopt_serve.artifact import Artifact, save_artifact  # noqa: E402
from jaxopt_serve.engine import export_model  # noqa: E402
from jaxopt_serve.models import CNNConfig, init_variables  # noqa: E402
from jaxopt_serve.serve import run_batch_inference  # noqa: E402
from jaxopt_serve.serve.ray_data import EnginePredictor, ray_batch_inference  # noqa: E402
from jaxopt_serve.serve.servable import load_servable  # noqa: E402

CNN = CNNConfig(channels=(8, 16), hidden=16)  # its outputs depend on the batch bucket in the last bit
ROWS = 1000
SPLITS = (0, 300, 333, ROWS)  # uneven shards: chunks straddle shard boundaries
# Ray's own modules warn about their own deprecated settings (DataContext defaults); not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_data")
    save_artifact(root / "cnn.jxs", Artifact(CNN, init_variables(CNN, 0), (8, 8, 1)))
    export_model(root / "cnn.jxe", CNN, init_variables(CNN, 0))
    x = np.random.default_rng(0).normal(size=(ROWS, 8, 8, 1)).astype(np.float32)
    np.save(root / "all.npy", x)
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i, (lo, hi) in enumerate(zip(SPLITS, SPLITS[1:])):
        np.save(root / f"part-{i}.npy", x[lo:hi])
        flat = pa.FixedSizeListArray.from_arrays(pa.array(x[lo:hi].reshape(-1)), 64)
        pq.write_table(pa.table({"image": flat}), root / f"part-{i}.parquet", row_group_size=50)
    return root, x


def _reference(root, model, chunk_size):
    out = root / f"reference-{model}-{chunk_size}.npy"
    if not out.exists():
        engine = load_servable(root / model, max_batch=min(chunk_size, 1024))
        run_batch_inference(
            engine, root / "all.npy", out, artifact_path=root / model, chunk_size=chunk_size, progress=False
        )
    return out.read_bytes()


@pytest.mark.parametrize(
    ("model", "pattern", "key"), [("cnn.jxs", "part-*.npy", None), ("cnn.jxe", "part-*.parquet", "image")]
)
def test_sharded_output_is_byte_identical_to_run_batch_inference(local_ray, data, tmp_path, model, pattern, key):
    root, _ = data
    out = tmp_path / "out.npy"
    summary = ray_batch_inference(root / model, str(root / pattern), out, key=key, chunk_size=64, actors=2)
    assert summary["rows"] == ROWS and summary["chunks"] == -(-ROWS // 64)
    assert out.read_bytes() == _reference(root, model, 64)
    assert not (tmp_path / "out.npy.partial").exists()


def _actor_pids():
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"_ChunkRunner" in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def test_actor_killed_mid_run_is_retried_and_output_still_identical(local_ray, data, tmp_path):
    root, _ = data
    killed, seen = [], []

    def on_chunk(done, total):
        seen.append(done)
        if done == 5 and not killed:
            pids = _actor_pids()
            assert pids, "no actor process found to kill"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    out = tmp_path / "out.npy"
    summary = ray_batch_inference(
        root / "cnn.jxs", [root / f"part-{i}.npy" for i in range(3)], out, chunk_size=16, actors=2, on_chunk=on_chunk
    )
    assert killed and seen[-1] == summary["chunks"] == -(-ROWS // 16)
    assert seen[-1] - 5 > 2, "the run ended right after the kill: nothing was retried"
    assert not os.path.exists(f"/proc/{killed[0]}") or killed[0] not in _actor_pids()
    assert out.read_bytes() == _reference(root, "cnn.jxs", 16)


def test_engine_predictor_in_a_users_own_pipeline(local_ray, data):
    root, x = data
    ds = ray.data.from_items([{"id": i, "data": x[i]} for i in range(200)])
    ds = ds.map_batches(
        EnginePredictor,
        fn_constructor_kwargs={"model_path": str(root / "cnn.jxs"), "max_batch": 32},
        batch_size=32,
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    rows = sorted(ds.take_all(), key=lambda r: r["id"])
    got = np.stack([r["output"] for r in rows])
    expected = load_servable(root / "cnn.jxs", max_batch=32)(x[:200])
    # the same rows may meet the engine in other buckets than in one call: last-bit differences only
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert [r["id"] for r in rows] == list(range(200))


def test_bad_arguments_are_refused_naming_them(local_ray, data, tmp_path):
    root, _ = data
    with pytest.raises(ValueError, match="model_path .*missing.jxs does not exist"):
        ray_batch_inference(root / "missing.jxs", str(root / "part-*.npy"), tmp_path / "o.npy")
    with pytest.raises(ValueError, match="matches no file"):
        ray_batch_inference(root / "cnn.jxs", str(root / "nothing-*.npy"), tmp_path / "o.npy")
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        ray_batch_inference(root / "cnn.jxs", str(root / "part-*.npy"), tmp_path / "o.npy", chunk_size=0)
    with pytest.raises(ValueError, match=r"output_path .*o\.txt must end in \.npy"):
        ray_batch_inference(root / "cnn.jxs", str(root / "part-*.npy"), tmp_path / "o.txt")


def test_non_finite_rows_stop_the_job_naming_them(local_ray, data, tmp_path):
    root, x = data
    bad = x[:100].copy()
    bad[70, 0, 0, 0] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError, match=r"rows \[70\]"):
        ray_batch_inference(root / "cnn.jxs", tmp_path / "bad.npy", tmp_path / "o.npy", chunk_size=32, actors=1)
    assert not (tmp_path / "o.npy").exists() and not (tmp_path / "o.npy.partial").exists()

import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from conftest import random_variables
from jaxopt_serve.engine import InferenceEngine, default_buckets
from jaxopt_serve.models import CNNConfig, MLPConfig, predict_fn
from jaxopt_serve.quant import QuantRule, QuantSpec, quantize
from jaxopt_serve.quant.runtime import quantized_predict_fn
from jaxopt_serve.timing import CompileCounter

CNN = CNNConfig(channels=(8, 16), hidden=16)


@pytest.fixture(scope="module")
def cnn_variables():
    return jax.tree.map(np.asarray, random_variables(CNN, seed=2))


def test_no_batch_size_compiles_after_warmup(cnn_variables):
    engine = InferenceEngine(CNN, cnn_variables, max_batch=32).warmup()
    assert engine.compile_count == len(engine.buckets) == len(default_buckets(32))
    x = np.random.default_rng(0).normal(size=(75, 8, 8, 1)).astype(np.float32)
    engine(x[:3])  # first call: transfers, no compile
    with CompileCounter() as compiles:
        for n in list(range(1, 33)) + [40, 75]:
            engine(x[:n])
    assert compiles.count == 0 and engine.compile_count == len(engine.buckets)


@pytest.mark.parametrize("n", [1, 5, 16, 33, 70])
def test_padding_and_splitting_do_not_change_outputs(cnn_variables, n):
    engine = InferenceEngine(CNN, cnn_variables, max_batch=16)
    x = np.random.default_rng(n).normal(size=(n, 8, 8, 1)).astype(np.float32)
    expected = np.asarray(jax.jit(predict_fn(CNN))(cnn_variables, x))
    # another batch size may take another summation order in XLA's conv: float32 rounding only
    np.testing.assert_allclose(engine(x), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_bfloat16_policy_stays_close_and_returns_float32(cnn_variables):
    x = np.random.default_rng(1).normal(size=(8, 8, 8, 1)).astype(np.float32)
    f32 = InferenceEngine(CNN, cnn_variables, max_batch=8)(x)
    bf16 = InferenceEngine(CNN, cnn_variables, max_batch=8, dtype="bfloat16")(x)
    assert bf16.dtype == np.float32
    scale = np.abs(f32).max()
    assert np.abs(bf16 - f32).max() <= 0.05 * scale  # bf16 keeps 8 bits of mantissa


def test_quantized_variables_run_quantized(cnn_variables):
    q = quantize(cnn_variables, [QuantRule(r"params/.*/kernel", QuantSpec(qtype="int8"))]).variables
    x = np.random.default_rng(3).normal(size=(6, 8, 8, 1)).astype(np.float32)
    engine = InferenceEngine(CNN, q, max_batch=8, quant_mode="dynamic")
    assert engine.quantized
    np.testing.assert_allclose(engine(x), quantized_predict_fn(CNN, mode="dynamic")(q, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "x, message",
    [
        (
            np.zeros((2, 8, 8, 3), np.float32),
            re.escape("expected a batch of shape (batch, 8, 8, 1) for 'cnn', got (2, 8, 8, 3)"),
        ),
        (np.zeros((8, 8, 1), np.float32), re.escape("got (8, 8, 1)")),
        (np.zeros((2, 8, 8, 1), np.int32), "expected float32 inputs for 'cnn', got int32"),
        (np.zeros((0, 8, 8, 1), np.float32), "empty batch"),
    ],
)
def test_bad_inputs_fail_before_dispatch(cnn_variables, x, message):
    engine = InferenceEngine(CNN, cnn_variables, max_batch=4)
    with pytest.raises(ValueError, match=message):
        engine(x)
    assert engine.compile_count == 0


def test_nan_policy(cnn_variables):
    x = np.zeros((3, 8, 8, 1), np.float32)
    x[1, 2, 3, 0] = np.nan
    with pytest.raises(ValueError, match=r"non-finite inputs \(NaN or inf\) in rows \[1\]"):
        InferenceEngine(CNN, cnn_variables, max_batch=4, nan_policy="error")(x)
    out = InferenceEngine(CNN, cnn_variables, max_batch=4)(x)  # "propagate": computed as given
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()


def test_persistent_cache_serves_a_fresh_process(tmp_path):
    script = textwrap.dedent(f"""
        import jax, numpy as np
        hits = []
        jax.monitoring.register_event_listener(lambda e, **k: hits.append(e) if e.endswith("cache_hits") else None)
        from jaxopt_serve.engine import InferenceEngine, enable_compilation_cache
        from jaxopt_serve.models import MLPConfig, init_variables
        enable_compilation_cache({str(tmp_path / "cache")!r})
        cfg = MLPConfig(features=(32,))
        engine = InferenceEngine(cfg, init_variables(cfg, 0), max_batch=4).warmup()
        print(len(hits))
    """)
    runs = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120) for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
    first, second = (int(r.stdout.split()[-1]) for r in runs)
    assert first == 0 and second >= 3  # the three buckets (1, 2, 4) come from the cache
    assert any((tmp_path / "cache").iterdir())


def test_cache_directory_must_be_private(tmp_path):
    from jaxopt_serve.engine import enable_compilation_cache

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ValueError, match="writable by other users"):
        enable_compilation_cache(shared)


def test_buckets_must_fit_the_mesh(cnn_variables):
    from jaxopt_serve.engine import make_mesh

    with pytest.raises(ValueError, match=r"must be positive multiples of the mesh's data axis \(4\)"):
        InferenceEngine(CNN, cnn_variables, buckets=(2, 8), mesh=make_mesh(data=4))
    assert InferenceEngine(
        MLPConfig(features=(8,)), random_variables(MLPConfig(features=(8,))), max_batch=16, mesh=make_mesh(data=4)
    ).buckets == (4, 8, 16)


def test_compiler_options_reach_this_engines_executables_only(cnn_variables, tmp_path):
    """XLA options given to one engine apply to its compiles (here: dumping their HLO), not to other engines."""
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype(np.float32)
    dump = tmp_path / "hlo"
    options = {"xla_dump_to": str(dump), "xla_dump_hlo_as_text": True}
    tuned = InferenceEngine(CNN, cnn_variables, max_batch=4, buckets=(4,), compiler_options=options)
    assert tuned.compiler_options == options
    before = set(dump.glob("*")) if dump.exists() else set()
    plain = InferenceEngine(CNN, cnn_variables, max_batch=4, buckets=(4,))
    np.testing.assert_array_equal(plain(x), plain(x))
    assert (set(dump.glob("*")) if dump.exists() else set()) == before  # the other engine dumps nothing
    np.testing.assert_allclose(tuned(x), plain(x), rtol=1e-6, atol=1e-6)
    new = {p.name for p in set(dump.glob("*")) - before}
    assert any("jit_run" in name and "after_optimizations" in name for name in new), sorted(new)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"xla_no_such_option": True}, "xla_no_such_option"),
        ({"xla_cpu_experimental_ynn_fusion_type": "BOGUS"}, "BOGUS"),
        ({"xla_dump_to": None}, "xla_dump_to"),
        ([("xla_dump_to", "x")], "mapping"),
    ],
)
def test_bad_compiler_options_fail_at_construction(cnn_variables, options, message):
    with pytest.raises(ValueError, match=message):
        InferenceEngine(CNN, cnn_variables, max_batch=2, compiler_options=options)

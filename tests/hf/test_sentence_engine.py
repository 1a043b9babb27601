"""all-MiniLM-L6-v2 on the core: one embedding Model through the engine, export, the batcher and the quantized runtime.

Compiles are the cost here (seconds each for MiniLM on a small CPU): one engine
with 2 batch x 2 length buckets is shared by the module, and every other
compiled shape is chosen to be one of few.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tokenizers")  # the hf extra; `make test` installs it

from sentences import minilm_sentences  # noqa: E402

from jaxopt_serve.hf import LENGTH_AXES, SentenceEncoder, bundled_minilm_dir, embedding_model  # noqa: E402
from jaxopt_serve.quant import QuantRule, QuantSpec  # noqa: E402
from jaxopt_serve.quant.runtime import execution_report  # noqa: E402
from jaxopt_serve.quant.smooth import smooth_quantize  # noqa: E402
from jaxopt_serve.serve import DynamicBatcher  # noqa: E402
from standalone import run_standalone  # noqa: E402

BUCKETS, LENGTHS = (4, 8), (16, 32)
KERNELS = r"params/layer_\d+/(attention/(query|key|value|out)|intermediate|output)/kernel"


def cosines(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder(bundled_minilm_dir())


@pytest.fixture(scope="module")
def engine(encoder):
    engine = encoder.engine(buckets=BUCKETS, length_buckets=LENGTHS).warmup()
    assert engine.compile_count == len(BUCKETS) * len(LENGTHS)
    return engine


@pytest.fixture(scope="module")
def sentences(encoder):
    """12 sentences whose token counts span both length buckets (9 of at most 16 tokens, 3 of 17 to 32)."""
    pool = minilm_sentences()
    lengths = [len(e.ids) for e in encoder.tokenizer.encode_batch(pool)]
    short = [s for s, n in zip(pool, lengths) if n <= 16][::5][:9]
    long = [s for s, n in zip(pool, lengths) if 16 < n <= 32][:3]
    assert len(short) == 9 and len(long) == 3
    return [*short[:3], long[0], *short[3:6], long[1], *short[6:], long[2]]


@pytest.fixture(scope="module")
def batch(encoder, sentences):
    inputs = encoder.inputs(sentences)
    assert 16 < inputs["input_ids"].shape[1] <= 32 and inputs["attention_mask"].sum(1).min() <= 16
    return inputs


@pytest.fixture(scope="module")
def engine_out(engine, batch):
    return engine(batch)


def reference_embeddings(encoder, ids, mask):
    """The reference path, written out: jax.jit of the Transformer's encode, mean pooling, L2 normalization."""
    module = encoder.config.build()

    @jax.jit
    def embed(variables, ids, mask):
        hidden = module.apply(variables, ids, attention_mask=mask, method="encode")
        m = mask[..., None].astype(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1)
        return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)

    return np.asarray(embed(encoder.variables, ids, mask))


def test_engine_embeddings_equal_the_reference(encoder, engine, sentences, batch, engine_out):
    reference = reference_embeddings(encoder, batch["input_ids"], batch["attention_mask"])  # unpadded (12, 20)
    cosine = cosines(engine_out, reference)
    assert engine_out.shape == (12, 384) and engine_out.dtype == np.float32
    assert cosine.min() >= 0.99999, f"worst sentence {int(cosine.argmin())}: cosine {cosine.min():.7f}"
    embedded = encoder.embed(sentences, batch_size=12, engine=engine)  # strings -> tokens -> the same engine
    assert cosines(embedded, reference).min() >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=-1), 1.0, rtol=1e-5)
    assert engine.compile_count == len(BUCKETS) * len(LENGTHS)


def test_padding_is_never_attended(encoder, engine, sentences, batch, engine_out):
    for i in (0, 4):  # short sentences: alone (bucket 16) vs in the batch padded to 32 next to 20-token ones
        alone = engine(encoder.inputs([sentences[i]]))
        assert encoder.inputs([sentences[i]])["input_ids"].shape[1] <= 16
        assert cosines(alone, engine_out[i : i + 1])[0] >= 0.99999
    noisy = dict(batch)
    pad = batch["attention_mask"] == 0
    assert pad.sum() > 50
    noisy["input_ids"] = np.where(pad, np.random.default_rng(0).integers(1000, 30000, pad.shape), batch["input_ids"])
    noisy["input_ids"] = noisy["input_ids"].astype(np.int32)
    out = engine(noisy)
    assert cosines(out, engine_out).min() >= 0.99999
    np.testing.assert_allclose(out, engine_out, atol=1e-6)


def test_export_runs_without_the_library(tmp_path, encoder, engine, sentences, batch, engine_out):
    path = tmp_path / "minilm.jxe"
    assert encoder.export(path) == path.stat().st_size
    few = encoder.inputs(sentences[:3])  # another batch size and length: both axes are symbolic
    standalone = run_standalone(tmp_path, [(path, batch, "dict"), (path, few, "dict")])
    for (out,), want in zip(standalone, (engine_out, engine(few))):
        assert out.shape == want.shape
        cosine = cosines(out, want)
        assert cosine.min() >= 0.99999, f"worst row {int(cosine.argmin())}: cosine {cosine.min():.7f}"


def test_batcher_mixes_lengths_and_matches_the_engine(encoder, engine, sentences, engine_out):
    requests = [encoder.inputs([s]) for s in sentences[:8]]  # each padded only to its own length
    assert len({r["input_ids"].shape[1] for r in requests}) > 3
    with DynamicBatcher(engine, max_wait_ms=200) as batcher:
        outputs = [f.result() for f in [batcher.submit(r) for r in requests]]
        assert max(int(k) for k in batcher.metrics.snapshot()["batch_rows"]) > 1  # lengths shared a batch
    got = np.concatenate(outputs)
    assert got.shape == (8, 384)
    assert cosines(got, engine_out[:8]).min() >= 0.99999
    assert engine.compile_count == len(BUCKETS) * len(LENGTHS)


def test_compile_count_is_fixed_after_warmup(engine):
    rng = np.random.default_rng(1)
    for rows, length in [(1, 5), (3, 16), (4, 17), (7, 32), (8, 9), (11, 30), (20, 12)]:
        ids = rng.integers(1000, 30000, (rows, length)).astype(np.int32)
        mask = np.ones((rows, length), np.int32)
        mask[0, length // 2 :] = 0
        assert engine({"input_ids": ids, "attention_mask": mask}).shape == (rows, 384)
    assert engine.compile_count == len(BUCKETS) * len(LENGTHS)
    with pytest.raises(
        ValueError, match=r"inputs\[0\]\['attention_mask'\]: length 33 exceeds the largest length bucket 32"
    ):
        engine({"input_ids": np.zeros((1, 33), np.int32), "attention_mask": np.ones((1, 33), np.int32)})
    with pytest.raises(
        ValueError, match=r"inputs\[0\]\['input_ids'\]: length 12 .* differs from .*attention_mask.* 10"
    ):
        engine({"input_ids": np.zeros((2, 12), np.int32), "attention_mask": np.ones((2, 10), np.int32)})
    assert engine.compile_count == len(BUCKETS) * len(LENGTHS)


def test_quantized_variables_run_through_the_same_model(encoder, sentences, batch, engine_out):
    rules = [QuantRule(KERNELS, QuantSpec(qtype="int8"))]
    calibration = encoder.inputs(minilm_sentences()[40:56])
    smoothed = smooth_quantize(encoder.model, encoder.variables, calibration, rules, alpha=0.5)
    qmodel = embedding_model(encoder.config, smoothed)  # a Model may also hold quantized variables
    report = execution_report(qmodel, qmodel.variables, batch, mode="dynamic")
    assert len(report) == 36 and {how for ops in report.values() for _, how in ops} == {"int8"}
    qengine = encoder.engine(variables=smoothed, quant_mode="dynamic", buckets=(16,), length_buckets=(32,))
    assert qengine.quantized
    cosine = cosines(qengine(batch), engine_out)
    assert cosine.min() >= 0.99 and cosine.mean() >= 0.995, (cosine.min(), cosine.mean())
    with pytest.raises(ValueError, match=r"variables lack params/layer_5/"):
        encoder.engine(variables={"params": {k: v for k, v in encoder.variables["params"].items() if k != "layer_5"}})


def test_length_axes_and_default_buckets(encoder):
    assert LENGTH_AXES == {"input_ids": 1, "attention_mask": 1}
    spec = encoder.model.input_spec()[0]
    assert sorted(spec) == ["attention_mask", "input_ids"] and spec["input_ids"].dtype == np.int32
    assert encoder.model.outputs_spec(3).shape == (3, encoder.config.hidden_size)
    assert encoder.engine().length_buckets == (16, 32, 64, 128, 256)  # up to max_seq_length: nothing is truncated
    assert encoder.serving_engine.length_buckets == tuple(range(32, 513, 32))  # what embed() compiles, when met


def test_calibration_batches_sort_by_length_and_cut_padding(encoder):
    pool = minilm_sentences()[:100]
    batches = encoder.calibration_batches(pool, batch_size=16, multiple=8)
    assert [len(b["input_ids"]) for b in batches] == [16] * 6 + [4]
    counts = [b["attention_mask"].sum(1) for b in batches]
    widths = [b["input_ids"].shape[1] for b in batches]
    assert all(w % 8 == 0 and w - c.max() < 8 for w, c in zip(widths, counts))
    flat = np.concatenate(counts)
    assert np.all(np.diff(flat) >= 0)  # shortest first
    lengths = [len(e.ids) for e in encoder.tokenizer.encode_batch(pool)]
    assert sorted(flat.tolist()) == sorted(lengths)  # every sentence once, none truncated
    padded_together = encoder.inputs(pool)["attention_mask"]
    assert flat.sum() / sum(b["attention_mask"].size for b in batches) > padded_together.mean()
    with pytest.raises(ValueError, match="sentence 2 is empty"):
        encoder.calibration_batches(["a", "b", " "])
    with pytest.raises(ValueError, match="multiple must be a positive int"):
        encoder.calibration_batches(pool, multiple=0)

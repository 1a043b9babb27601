import json

from jaxopt_serve.cli import main
from jaxopt_serve.demo import ROW_KEYS
from jaxopt_serve.models import CNNConfig


def test_demo_prints_the_table_and_writes_json(tmp_path, capsys, monkeypatch):
    # Shrink the demo so the test stays cheap; the real demo trains the default CNN for 600 steps.
    import jaxopt_serve.demo as demo

    original = demo.run_demo
    monkeypatch.setattr(demo, "run_demo", lambda **kw: original(config=CNNConfig(channels=(8, 16), hidden=16),
                                                                   latency_repeats=5, qat_steps=20, prune_steps=40,
                                                                   distill_steps=20,
                                                                   student=CNNConfig(channels=(4, 6), hidden=8),
                                                                   served_seconds=0.3, **kw))
    path = tmp_path / "demo.json"
    assert main(["demo", "--steps", "40", "--no-progress", "--json", str(path), "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "p50 latency b1 (ms)" in out and "\nf32 " in out
    report = json.loads(path.read_text())
    assert set(report) == {"device", "rows"}
    assert report["device"].startswith("cpu")
    rows = {row["variant"]: row for row in report["rows"]}
    assert list(rows) == ["f32", "int8 W8A8 dynamic", "int8 W8A8 static", "int4 g32 weight-only", "ternary QAT",
                          "90% sparse + int4", "50% structured", "distilled student", "student + int8",
                          "served, 32 clients"]
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
    assert rows["distilled student"]["params"] < 0.3 * rows["f32"]["params"]  # 21% for the default CNN; the classifier weighs more here
    assert rows["student + int8"]["bytes"] < rows["distilled student"]["bytes"]
    # int8 PTQ of a trained model keeps its accuracy within a couple of test images
    assert abs(rows["int8 W8A8 dynamic"]["accuracy"] - rows["f32"]["accuracy"]) <= 0.02

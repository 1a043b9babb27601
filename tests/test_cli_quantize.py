import json

import numpy as np
import pytest

from jaxopt_serve.artifact import load_artifact
from jaxopt_serve.cli import main
from jaxopt_serve.models import predict_fn
from jaxopt_serve.quant import QArray
from jaxopt_serve.quant.runtime import quantized_predict_fn
from jaxopt_serve.train import accuracy


def test_quantize_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: jaxopt-serve quantize")
    for option in ("--bits", "--granularity", "--group-size", "--asymmetric", "--calibration", "--keep-float"):
        assert option in out


@pytest.mark.parametrize(
    ("args", "qtype", "min_ratio"),
    [
        # Measured on the small session CNN (2,194 params, 9.7 kB): 2.02x and 2.13x; its
        # header and float biases/batch norm weigh as much as its int8 kernels.
        ([], "int8", 1.9),
        (
            ["--bits", "4", "--granularity", "group", "--group-size", "8", "--keep-float", "params/conv_0/kernel"],
            "int4",
            2.0,
        ),
    ],
    ids=["int8", "int4-group"],
)
def test_quantize_writes_a_smaller_artifact_that_keeps_its_accuracy(
    tmp_path, float_artifact, digits, capsys, args, qtype, min_ratio
):
    out = tmp_path / "q.jxs"
    assert main(["quantize", str(float_artifact), *args, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    before, after = float_artifact.stat().st_size, out.stat().st_size
    assert f"size: {before:,} -> {after:,} bytes ({before / after:.2f}x smaller)" in printed
    assert before / after >= min_ratio
    assert "unused rules" not in printed

    loaded = load_artifact(out)
    keep_float = loaded.metadata["quantization"]["keep_float"]
    for name in ("conv_0", "conv_1", "dense", "classifier"):
        kernel = loaded.variables["params"][name]["kernel"]
        if f"params/{name}/kernel" in keep_float:
            assert isinstance(kernel, np.ndarray) and kernel.dtype == np.float32
        else:
            assert isinstance(kernel, QArray) and kernel.qtype == qtype
    float_acc = accuracy(
        predict_fn(loaded.config), load_artifact(float_artifact).variables, digits.x_test, digits.y_test
    )
    quant_acc = accuracy(
        quantized_predict_fn(loaded.config, mode="auto"), loaded.variables, digits.x_test, digits.y_test
    )
    assert abs(quant_acc - float_acc) <= 0.02, (float_acc, quant_acc)
    # `eval` reads quantized artifacts too (on their dequantized weights).
    assert main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "auto" and result["accuracy"] == pytest.approx(quant_acc)


def test_unused_keep_float_rules_are_listed(tmp_path, float_artifact, capsys):
    out = tmp_path / "q.jxs"
    assert (
        main(
            [
                "quantize",
                str(float_artifact),
                "--keep-float",
                "params/nothing/.*",
                "params/dense/kernel",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert "unused rules (matched no parameter): ['params/nothing/.*']" in capsys.readouterr().out
    assert not isinstance(load_artifact(out).variables["params"]["dense"]["kernel"], QArray)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--bits", "4", "--granularity", "group", "--group-size", "5"],
            "params/classifier/kernel: group_size 5 does not divide axis 0 of shape (32, 10)",
        ),
        (["--granularity", "group"], "granularity='group' needs a positive int group_size"),
        (["--group-size", "8"], "group_size is only used with granularity='group'"),
        (["--bits", "ternary", "--asymmetric"], "ternary quantization is symmetric only"),
        (["--keep-float", "conv_("], "is not a valid regex"),
    ],
    ids=["group-size", "no-group-size", "group-size-without-group", "asymmetric-ternary", "bad-regex"],
)
def test_errors_exit_2_and_write_nothing(tmp_path, float_artifact, capsys, args, message):
    out = tmp_path / "q.jxs"
    assert main(["quantize", str(float_artifact), *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not out.exists()


def test_quantizing_a_quantized_artifact_is_an_error(tmp_path, float_artifact, capsys):
    once = tmp_path / "once.jxs"
    assert main(["quantize", str(float_artifact), "-o", str(once)]) == 0
    assert main(["quantize", str(once), "-o", str(tmp_path / "twice.jxs")]) == 2
    assert "'quantized' layout" in capsys.readouterr().err
    assert not (tmp_path / "twice.jxs").exists()

import numpy as np
import pytest

from jaxopt_serve.artifact import load_artifact
from jaxopt_serve.cli import main
from jaxopt_serve.quant import QArray


def test_prune_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--sparsity",
        "--method",
        "--nm",
        "--scope",
        "--criterion",
        "--finetune-steps",
        "--gradual",
        "--bits",
    ):
        assert option in out


def _sizes(capsys):
    line = next(out for out in capsys.readouterr().out.splitlines() if out.startswith("size:"))
    before, after = (int(v.replace(",", "")) for v in line.split()[1:4:2])
    return before, after


def test_magnitude_prune_with_int4_writes_a_small_sparse_artifact(tmp_path, float_artifact, capsys):
    out = tmp_path / "sparse.jxs"
    assert (
        main(
            [
                "prune",
                str(float_artifact),
                "--sparsity",
                "0.8",
                "--bits",
                "4",
                "--finetune-steps",
                "30",
                "--no-progress",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    before, after = _sizes(capsys)
    assert after == out.stat().st_size and before / after > 4  # a 10 KB model: the header is a fifth of the file
    loaded = load_artifact(out)
    assert loaded.layout == "sparse"
    kernel = loaded.variables["params"]["conv_1"]["kernel"]
    assert isinstance(kernel, QArray) and kernel.qtype == "int4"
    codes = np.concatenate(
        [
            np.asarray(loaded.variables["params"][n]["kernel"].int_values()).ravel()
            for n in ("conv_0", "conv_1", "dense", "classifier")
        ]
    )
    assert (codes == 0).mean() >= 0.8
    assert main(["eval", str(out), "--json"]) == 0
    assert '"accuracy"' in capsys.readouterr().out


def test_structured_prune_writes_a_smaller_dense_model(tmp_path, float_artifact, capsys, trained_cnn):
    out = tmp_path / "small.jxs"
    assert (
        main(
            [
                "prune",
                str(float_artifact),
                "--method",
                "structured",
                "--sparsity",
                "0.5",
                "--no-progress",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    loaded = load_artifact(out)
    assert loaded.layout == "dense"
    assert loaded.config.channels == tuple(c // 2 for c in trained_cnn[0].config.channels)
    before, after = _sizes(capsys)
    assert before / after > 2.5


def test_nm_prune_is_exact_and_keep_float_skips_a_layer(tmp_path, float_artifact):
    out = tmp_path / "nm.jxs"
    assert (
        main(
            [
                "prune",
                str(float_artifact),
                "--method",
                "nm",
                "--nm",
                "2:4",
                "--keep-float",
                "params/conv_0/kernel",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    params = load_artifact(out).variables["params"]
    kernel = np.asarray(params["conv_1"]["kernel"])  # (3, 3, in, out): groups of 4 input channels
    groups = np.moveaxis(kernel, 2, -1).reshape(3, 3, kernel.shape[3], -1, 4)
    assert ((groups != 0).sum(-1) <= 2).all()
    assert (np.asarray(params["conv_0"]["kernel"]) != 0).all()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity", "1.0"], "--sparsity: sparsity must be a number in [0, 1)"),
        (["--method", "nm", "--nm", "4:2"], "N <= M"),
        (["--method", "nm"], "params/conv_0/kernel: N:M sparsity 2:4 needs axis 2 (length 1)"),
        (["--gradual"], "--gradual needs --method magnitude and --finetune-steps"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(tmp_path, float_artifact, capsys, args, message):
    out = tmp_path / "never.jxs"
    assert main(["prune", str(float_artifact), *args, "-o", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()

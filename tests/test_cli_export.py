import numpy as np
import pytest

from jaxopt_serve.cli import main
from jaxopt_serve.exported import load_exported
from jaxopt_serve.models import predict_fn


def test_export_writes_a_file_that_runs(tmp_path, float_artifact, trained_cnn, capsys, digits):
    source = float_artifact
    out = tmp_path / "cnn.jxe"
    assert main(["export", str(source), "-o", str(out)]) == 0
    assert "batch dimension symbolic" in capsys.readouterr().out
    model = load_exported(out)
    x = digits.x_test[:9]
    expected = np.asarray(predict_fn(trained_cnn[0].config)(trained_cnn[0].variables, x))
    np.testing.assert_allclose(model(x), expected, rtol=1e-4, atol=1e-4)


def test_export_of_a_missing_file_exits_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope.jxs"), "-o", str(tmp_path / "x.jxe")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "x.jxe").exists()


@pytest.mark.parametrize("command", ["export"])
def test_help(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--quant-mode" in capsys.readouterr().out

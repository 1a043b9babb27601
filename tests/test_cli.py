import json
import subprocess
import sys

import pytest

from jaxopt_serve.artifact import save_artifact
from jaxopt_serve.cli import main


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["demo"]])
def test_help_on_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: jaxopt-serve")
    if command:
        assert f"jaxopt-serve {command[0]}" in out


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "jaxopt_serve", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "train" in result.stdout and "demo" in result.stdout


def test_train_then_eval(tmp_path, capsys):
    out = tmp_path / "mlp.jxs"
    assert main(["train", "--model", "mlp", "--steps", "120", "--no-progress", "-o", str(out)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "mlp" and result["accuracy"] > 0.85


def test_eval_of_a_corrupted_artifact_fails_with_the_reason(tmp_path, trained_cnn, capsys):
    path = tmp_path / "cnn.jxs"
    save_artifact(path, trained_cnn[0])
    path.write_bytes(path.read_bytes()[:-10])
    assert main(["eval", str(path)]) == 2
    assert "is truncated" in capsys.readouterr().err


def test_eval_of_a_missing_file(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "none.jxs")]) == 2
    assert "No such file" in capsys.readouterr().err


def test_missing_extra_is_reported_with_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert main(["train", "--steps", "1", "--no-progress", "-o", str(tmp_path / "x.jxs")]) == 2
    assert "pip install 'jaxopt_serve[data]'" in capsys.readouterr().err
    assert not (tmp_path / "x.jxs").exists()


def test_bad_steps_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])
    assert "expected a positive integer" in capsys.readouterr().err

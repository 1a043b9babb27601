import json

import pytest

from jaxopt_serve.artifact import load_artifact
from jaxopt_serve.cli import main
from jaxopt_serve.models import count_params


def test_distill_writes_a_smaller_student(tmp_path, float_artifact, trained_cnn, capsys):
    out = tmp_path / "student.jxs"
    assert (
        main(
            [
                "distill",
                str(float_artifact),
                "--student-config",
                '{"channels": [8, 8], "hidden": 16}',
                "--steps",
                "40",
                "--no-progress",
                "--checkpoint",
                str(tmp_path / "s.ckpt"),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "test accuracy: teacher" in printed
    student = load_artifact(out)
    assert student.config.channels == (8, 8) and student.config.hidden == 16
    assert count_params(student.variables) < count_params(trained_cnn[0].variables)
    assert student.metadata["distillation"]["steps"] == 40
    assert 0.0 < student.metadata["test_accuracy"] <= 1.0
    assert (tmp_path / "s.ckpt").exists()


def test_student_config_from_a_file_and_in_full_form(tmp_path, float_artifact):
    spec = tmp_path / "student.json"
    spec.write_text(json.dumps({"name": "mlp", "fields": {"features": [16]}}))
    out = tmp_path / "mlp.jxs"
    assert (
        main(
            [
                "distill",
                str(float_artifact),
                "--student-config",
                f"@{spec}",
                "--steps",
                "5",
                "--no-progress",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert load_artifact(out).config.name == "mlp"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--student-config", "{channels: 8}"], "--student-config is not valid JSON"),
        (["--student-config", '{"num_classes": 3}'], "teacher 'cnn' has 10 outputs, student 'cnn' has 3"),
        (["--student-config", "{}", "--temperature", "0"], "temperature must be > 0"),
        (["--student-config", "{}", "--hidden-pairs", "dense:conv_9"], "hidden layer 'conv_9' does not exist in 'cnn'"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, float_artifact, capsys, args, message):
    out = tmp_path / "never.jxs"
    assert main(["distill", str(float_artifact), *args, "--steps", "2", "--no-progress", "-o", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()

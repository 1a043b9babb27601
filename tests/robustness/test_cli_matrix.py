"""Every CLI command, given a bad value or path, exits 2 with one line naming it, before doing any work.

The matrix lives in ``cli_cases`` (shared with ``benchmarks/robustness_report.py``);
``main`` runs in this process with the commands' work replaced by a stub, so a
case that reaches the work counts as a bad value accepted.
"""

import pytest

from cli_cases import CASES, build_files, busy_port, case_ids, find_case, run_case


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    files = build_files(tmp_path_factory.mktemp("cli"))
    with busy_port() as port:
        files.busy_port = port
        yield files


@pytest.mark.parametrize("case_id", case_ids())
def test_bad_arguments_exit_2_with_one_line(files, case_id):
    outcome = run_case(find_case(case_id), files)
    assert outcome.status == "ok", outcome.detail


def test_the_matrix_covers_every_command_with_at_least_80_cases():
    from jaxopt_serve.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert {case.command for case in CASES} >= commands
    assert len(CASES) >= 80


def test_a_diverged_training_run_saves_nothing(tmp_path, monkeypatch, capsys):
    """A finite learning rate can still diverge: the CLI refuses to save NaN weights."""
    import numpy as np

    import jaxopt_serve.train
    from jaxopt_serve.artifact import Artifact
    from jaxopt_serve.cli import main
    from jaxopt_serve.models import MLPConfig, init_variables

    config = MLPConfig()
    variables = init_variables(config, 0)
    variables["params"]["classifier"]["bias"] = np.full(10, np.nan, np.float32)
    diverged = Artifact(config, variables, (8, 8, 1), {"test_accuracy": 0.1})
    monkeypatch.setattr(jaxopt_serve.train, "train_classifier", lambda *a, **k: (diverged, None))
    out = tmp_path / "m.jxs"
    assert main(["train", "--model", "mlp", "--no-progress", "-o", str(out)]) == 2
    assert "training diverged" in capsys.readouterr().err
    assert not out.exists()

"""``jaxopt-serve serve``: a real server process, spoken to over the Open Inference Protocol, stopped by SIGTERM."""

import json
import urllib.request

import numpy as np
import pytest
from serve_process import ServeProcess

pytest.importorskip("starlette")

from jaxopt_serve.artifact import Artifact, save_artifact  # noqa: E402
from jaxopt_serve.models import MLPConfig, init_variables  # noqa: E402

CONFIG = MLPConfig(features=(8,))


def test_cli_serves_named_models_and_drains_on_sigterm(tmp_path):
    path = tmp_path / "tiny.jxs"
    save_artifact(path, Artifact(CONFIG, init_variables(CONFIG, 0), (8, 8, 1)))
    with ServeProcess(f"digits={path}", str(path), "--max-batch", "2", "--preferred-batch-sizes", "1,2") as server:
        line = server.line
        assert line.startswith("serving digits (mlp, buckets (1, 2)), tiny (mlp, buckets (1, 2)) on http://"), line
        url = server.url
        body = json.dumps(
            {"inputs": [{"name": "input", "shape": [1, 8, 8, 1], "datatype": "FP32", "data": [0.5] * 64}]}
        ).encode()
        for name in ("digits", "tiny"):
            with urllib.request.urlopen(f"{url}/v2/models/{name}/infer", body, timeout=60) as r:
                reply = json.load(r)
            assert reply["model_name"] == name and np.asarray(reply["outputs"][0]["data"]).shape == (10,)
        code = server.stop()
    assert code == 0, server.err  # a clean exit: no SIGABRT, no traceback
    assert "stopped after finishing the accepted requests" in server.out and "Traceback" not in server.err


def test_cli_refuses_duplicate_names_and_a_missing_model(tmp_path, capsys):
    from jaxopt_serve.cli import main

    path = tmp_path / "m.jxs"
    save_artifact(path, Artifact(CONFIG, init_variables(CONFIG, 0), (8, 8, 1)))
    assert main(["serve", f"a={path}", f"a={path}", "--port", "0"]) == 2
    assert "['a'] is given twice" in capsys.readouterr().err
    assert main(["serve", "--port", "0"]) == 2
    assert "at least one artifact" in capsys.readouterr().err
    assert main(["serve", str(path), "--port", "0", "--max-batch", "2", "--preferred-batch-sizes", "1,4"]) == 2
    assert "preferred_batch_sizes must be integers in [1, max_batch=2], got [1, 4]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", str(path), "--preferred-batch-sizes", "16,x"])
    assert "expected a positive integer, got 'x'" in capsys.readouterr().err

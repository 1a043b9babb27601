import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

from jaxopt_serve.engine import InferenceEngine
from jaxopt_serve.models import CNNConfig, init_variables

CNN = CNNConfig(channels=(8, 16), hidden=16)

WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    from jaxopt_serve.engine.distributed import global_mesh, initialize
    process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    initialize(f"127.0.0.1:{port}", 2, process_id, local_device_count=2, initialization_timeout=60)
    import jax
    from jaxopt_serve.engine import InferenceEngine, model_parallel_rules
    from jaxopt_serve.models import CNNConfig, init_variables
    assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
    config = CNNConfig(channels=(8, 16), hidden=16)
    x = np.random.default_rng(0).normal(size=(12, 8, 8, 1)).astype(np.float32)
    mesh = global_mesh(model=2)  # 2 x 2 across both processes: data and model parallel at once
    engine = InferenceEngine(config, init_variables(config, 0), max_batch=16, mesh=mesh,
                             rules=model_parallel_rules(config))
    np.save(out, engine(x))
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_form_one_mesh_and_match_one_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(i), str(port), str(tmp_path / f"out{i}.npy")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        results = [p.communicate(timeout=240) for p in procs]  # a hung peer fails the test, never hangs CI
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    x = np.random.default_rng(0).normal(size=(12, 8, 8, 1)).astype(np.float32)
    reference = InferenceEngine(CNN, init_variables(CNN, 0), max_batch=16)(x)
    for i in range(2):  # every process gets the whole, gathered output
        np.testing.assert_allclose(np.load(tmp_path / f"out{i}.npy"), reference, rtol=1e-5, atol=1e-5)

"""Run exported artifacts in a fresh interpreter where ``jaxopt_serve`` cannot be imported."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np

import jaxopt_serve.exported

# A fresh interpreter where jaxopt_serve cannot be imported; the loader is a copy of exported.py in another folder.
LOADER = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.modules["jaxopt_serve"] = None
    sys.path.insert(0, sys.argv[1])
    import exported_copy
    import jax
    for job in json.loads(open(sys.argv[2]).read()):
        model = exported_copy.load_exported(job["artifact"])
        with np.load(job["inputs"]) as npz:
            if job["call"] == "dict":
                out = model({name: npz[name] for name in npz.files})
            else:
                out = model(*(npz[str(i)] for i in range(len(npz.files))))
        np.savez(job["outputs"], *jax.tree.leaves(out))
    assert not any(name.startswith("jaxopt_serve") and mod is not None for name, mod in sys.modules.items())
""")


def run_standalone(tmp_path, jobs):
    """Run every job (artifact, inputs, call style) in one fresh process; returns each job's output leaves."""
    folder = tmp_path / "standalone"
    folder.mkdir()
    shutil.copy(jaxopt_serve.exported.__file__, folder / "exported_copy.py")
    specs = []
    for i, (artifact, inputs, call) in enumerate(jobs):
        np.savez(tmp_path / f"in{i}.npz", **(inputs if call == "dict" else {str(k): a for k, a in enumerate(inputs)}))
        specs.append(
            {
                "artifact": str(artifact),
                "inputs": str(tmp_path / f"in{i}.npz"),
                "outputs": str(tmp_path / f"out{i}.npz"),
                "call": call,
            }
        )
    (tmp_path / "jobs.json").write_text(json.dumps(specs))
    run = subprocess.run(
        [sys.executable, "-c", LOADER, str(folder), str(tmp_path / "jobs.json")],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr
    outputs = []
    for spec in specs:
        with np.load(spec["outputs"]) as npz:
            outputs.append([npz[f"arr_{k}"] for k in range(len(npz.files))])
    return outputs

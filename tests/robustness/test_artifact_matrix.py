"""Every artifact kind, damaged in every generated way, fails with one clear error naming the file, never hangs.

The matrix lives in ``artifact_cases`` (shared with ``benchmarks/robustness_report.py``):
dense, quantized, sparse and format-2 artifacts, exported models and
distillation checkpoints; truncations, byte and bit flips, zeroed regions,
pickles, the other format, paths that are not regular files, and hand edits
with a recomputed checksum (fields of the wrong type, NaN weights, swapped
same-shape exported leaves). Each case runs under a timeout.
"""

import fcntl
import os

import numpy as np
import pytest

from artifact_cases import KINDS, all_cases, build_bases, find_case, run_case
from jaxopt_serve.artifact import Artifact, ArtifactError, load_artifact, save_artifact
from jaxopt_serve.fileio import remove_stale_temporaries
from jaxopt_serve.models import MLPConfig, init_variables


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return build_bases(tmp_path_factory.mktemp("bases"))


@pytest.mark.parametrize("kind, name", all_cases(), ids=[f"{k}:{n}" for k, n in all_cases()])
def test_a_damaged_file_fails_clearly(bases, kind, name, tmp_path):
    outcome = run_case(bases[kind], find_case(kind, name), tmp_path, timeout=20)
    assert outcome.status == "ok", outcome.detail


def test_the_matrix_covers_every_kind_with_at_least_200_cases():
    cases = all_cases()
    assert len(cases) >= 200
    assert {kind for kind, _ in cases} == set(KINDS)


def test_nonfinite_weights_load_only_when_allowed(tmp_path):
    config = MLPConfig(features=(4,), num_classes=2)
    variables = init_variables(config, 0)
    variables["params"]["dense_0"]["bias"] = np.array([0, np.inf, 0, np.nan], np.float32)
    save_artifact(tmp_path / "nan.jxs", Artifact(config, variables, (8, 8, 1)))
    with pytest.raises(ArtifactError, match=r"nan\.jxs: variable params/dense_0/bias holds 2 non-finite value\(s\)"):
        load_artifact(tmp_path / "nan.jxs")
    loaded = load_artifact(tmp_path / "nan.jxs", allow_nonfinite=True)
    assert np.isnan(loaded.variables["params"]["dense_0"]["bias"][3])


def test_a_killed_save_leaves_a_temporary_file_that_the_next_save_removes(tmp_path):
    config = MLPConfig(features=(4,), num_classes=2)
    artifact = Artifact(config, init_variables(config, 0), (8, 8, 1))
    target = tmp_path / "model.jxs"
    stale = tmp_path / ".model.jxs.k1ll3d.tmp"  # what a save killed before its rename leaves
    stale.write_bytes(b"\0" * 4096)
    live = tmp_path / ".model.jxs.wr1t1ng.tmp"  # a save in progress holds its lock
    live.write_bytes(b"partial")
    other = tmp_path / ".other.jxs.abc.tmp"  # another file's temporary: not ours to remove
    other.write_bytes(b"x")
    with open(live, "rb") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        save_artifact(target, artifact)
        assert not stale.exists() and live.exists() and other.exists()
    assert load_artifact(target).config == config
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.jxs.wr1t1ng.tmp", ".other.jxs.abc.tmp", "model.jxs"]
    assert remove_stale_temporaries(target) == [live]  # its writer is gone now


def test_saves_leave_no_temporary_files_and_keep_the_usual_permissions(tmp_path):
    config = MLPConfig(features=(4,), num_classes=2)
    for _ in range(2):
        save_artifact(tmp_path / "m.jxs", Artifact(config, init_variables(config, 0), (8, 8, 1)))
    assert [p.name for p in tmp_path.iterdir()] == ["m.jxs"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.jxs").stat().st_mode & 0o777 == 0o666 & ~umask

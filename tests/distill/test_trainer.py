import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_serve.data import load_digit_tokens
from jaxopt_serve.distill import DistillConfig, distill, teacher_fn
from jaxopt_serve.models import MLPConfig, NNXMLPConfig, TransformerConfig, init_variables, predict_fn
from jaxopt_serve.quant import QuantRule, QuantSpec, quantize

TEACHER = MLPConfig(features=(32,))
STUDENT = MLPConfig(features=(8,))


@pytest.fixture(scope="module")
def teacher_variables():
    return init_variables(TEACHER, 0)


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_resumed_run_ends_with_the_parameters_of_an_uninterrupted_one(tmp_path, digits, teacher_variables):
    # A killed run is the same run stopped early: same optimizer (its schedule spans all 50 steps).
    from jaxopt_serve.train import default_optimizer

    kwargs = dict(seed=3, progress=False, patience=5, optimizer=default_optimizer(50))
    whole = distill(TEACHER, teacher_variables, STUDENT, digits, steps=50, **kwargs)
    path = tmp_path / "run.ckpt"
    # "killed" mid-epoch
    first = distill(TEACHER, teacher_variables, STUDENT, digits, steps=27, checkpoint=path, **kwargs)
    assert first.steps == 27 and path.is_dir()
    resumed = distill(TEACHER, teacher_variables, STUDENT, digits, steps=50, checkpoint=path, **kwargs)
    assert resumed.steps == 50
    _same(whole.final_variables, resumed.final_variables)
    _same(whole.variables, resumed.variables)
    assert resumed.best_val_accuracy == whole.best_val_accuracy
    assert [h["val_accuracy"] for h in resumed.history if "val_accuracy" in h] == [
        h["val_accuracy"] for h in whole.history if "val_accuracy" in h
    ]


def test_a_checkpoint_file_of_earlier_versions_resumes_and_becomes_a_directory(
    tmp_path, digits, teacher_variables, monkeypatch
):
    from jaxopt_serve.distill import trainer
    from jaxopt_serve.train import default_optimizer
    from robustness.artifact_cases import legacy_checkpoint_bytes

    kwargs = dict(seed=3, progress=False, patience=5, optimizer=default_optimizer(50))
    whole = distill(TEACHER, teacher_variables, STUDENT, digits, steps=50, **kwargs)
    path = tmp_path / "old.ckpt"
    with monkeypatch.context() as patch:  # the single-file writer of earlier versions
        patch.setattr(
            trainer,
            "save_checkpoint",
            lambda p, state, tracker, fingerprint: p.write_bytes(legacy_checkpoint_bytes(state, tracker, fingerprint)),
        )
        distill(TEACHER, teacher_variables, STUDENT, digits, steps=27, checkpoint=path, **kwargs)
    assert path.is_file()
    resumed = distill(TEACHER, teacher_variables, STUDENT, digits, steps=50, checkpoint=path, **kwargs)
    _same(whole.final_variables, resumed.final_variables)
    _same(whole.variables, resumed.variables)
    assert path.is_dir() and (tmp_path / "old.ckpt.v2").is_file()  # converted; the old file is kept beside


def test_a_checkpoint_of_another_run_is_refused(tmp_path, digits, teacher_variables):
    path = tmp_path / "run.ckpt"
    distill(TEACHER, teacher_variables, STUDENT, digits, steps=3, checkpoint=path, progress=False)
    with pytest.raises(ValueError, match=r"belongs to another run \(differs in \['seed'\]\)"):
        distill(TEACHER, teacher_variables, STUDENT, digits, steps=6, checkpoint=path, seed=1, progress=False)


def test_early_stopping_keeps_the_best_epoch(digits, teacher_variables):
    frozen = optax.sgd(0.0)  # nothing improves after the first epoch
    result = distill(
        TEACHER, teacher_variables, STUDENT, digits, steps=200, optimizer=frozen, patience=2, progress=False
    )
    per_epoch = (len(digits.x_train) - round(0.1 * len(digits.x_train))) // 64
    assert result.stopped_early and result.steps == 3 * per_epoch
    assert [h["step"] for h in result.history if "val_accuracy" in h] == [per_epoch, 2 * per_epoch, 3 * per_epoch]


def test_precomputed_teacher_outputs_train_the_same_student(digits, teacher_variables):
    online = distill(TEACHER, teacher_variables, STUDENT, digits, steps=8, progress=False, val_fraction=0.0)
    pre = distill(
        TEACHER,
        teacher_variables,
        STUDENT,
        digits,
        steps=8,
        progress=False,
        val_fraction=0.0,
        config=DistillConfig(teacher_mode="precomputed"),
    )
    for a, b in zip(jax.tree.leaves(online.variables), jax.tree.leaves(pre.variables)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # teacher logits from another batch shape


def test_a_quantized_teacher_and_an_nnx_student(digits, teacher_variables):
    q = quantize(teacher_variables, [QuantRule(r"params/.*/kernel", QuantSpec(qtype="int8"))]).variables
    logits, _ = teacher_fn(TEACHER, q)(jnp.asarray(digits.x_test[:8]))
    np.testing.assert_allclose(logits, predict_fn(TEACHER)(teacher_variables, digits.x_test[:8]), atol=0.05)
    student = NNXMLPConfig(features=(8,))
    result = distill(TEACHER, q, student, digits, steps=5, progress=False, val_fraction=0.0)
    assert set(result.variables["params"]) == {"dense_0", "classifier"}
    assert np.isfinite(result.history[-1]["loss"])


def test_hidden_state_distillation_learns_a_projection_on_the_encoder():
    tokens = load_digit_tokens()
    teacher = TransformerConfig(
        vocab_size=18, max_len=65, seq_len=65, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=16, num_classes=10
    )
    student = teacher.replace(num_layers=1, hidden_size=8, num_heads=1, mlp_dim=8)
    cfg = DistillConfig(hidden_pairs=((1, 2), (0, 0)), hidden_loss="cosine")
    result = distill(
        teacher,
        init_variables(teacher, 0),
        student,
        tokens,
        steps=4,
        progress=False,
        val_fraction=0.0,
        config=cfg,
        batch_size=32,
    )
    assert result.history[-1]["hidden"] > 0
    assert "proj" not in result.variables["params"] and "layer_0" in result.variables["params"]


def test_bad_inputs_are_clear_errors(digits, teacher_variables):
    with pytest.raises(ValueError, match="teacher 'mlp' has 10 outputs, student 'mlp' has 3"):
        distill(TEACHER, teacher_variables, STUDENT.replace(num_classes=3), digits, steps=1, progress=False)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DistillConfig(temperature=0.0)
    with pytest.raises(ValueError, match="hidden layer 'dense_7' does not exist in 'mlp'"):
        distill(
            TEACHER,
            teacher_variables,
            STUDENT,
            digits,
            steps=1,
            progress=False,
            config=DistillConfig(hidden_pairs=(("dense_0", "dense_7"),)),
        )
    tokens = load_digit_tokens()
    encoder = TransformerConfig(
        vocab_size=18, max_len=65, seq_len=65, hidden_size=8, num_layers=1, num_heads=1, mlp_dim=8, num_classes=10
    )
    with pytest.raises(
        ValueError, match=r"hidden layer 5 does not exist in 'transformer': it exposes hidden_states 0..1"
    ):
        distill(
            encoder,
            init_variables(encoder, 0),
            encoder,
            tokens,
            steps=1,
            progress=False,
            config=DistillConfig(hidden_pairs=((1, 5),)),
        )

import jax


def test_tests_see_eight_cpu_devices():
    assert len(jax.devices("cpu")) == 8

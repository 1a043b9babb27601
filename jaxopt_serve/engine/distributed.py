"""Multi-host runs: start ``jax.distributed`` and build the global mesh, so engine code runs unchanged.

On a TPU pod or several GPU hosts every process calls ``initialize`` (with
the coordinator's address, the process count and its own index), then builds
the same ``global_mesh`` over all processes' devices. On one machine, several
CPU processes emulate it (``local_device_count`` sets each process's CPU
devices; it must be called before JAX starts its backend).
"""

from __future__ import annotations

import jax

from jaxopt_serve.engine.sharding import make_mesh


def initialize(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    *,
    local_device_count: int | None = None,
    initialization_timeout: int = 60,
) -> None:
    """``jax.distributed.initialize`` with checks (and CPU device count for local emulation)."""
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", local_device_count)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout,
    )


def global_mesh(*, model: int = 1):
    """A ``("data", "model")`` mesh over every process's devices; ``data`` takes what ``model`` leaves."""
    devices = jax.devices()
    if len(devices) % model:
        raise ValueError(f"model axis {model} does not divide the {len(devices)} global devices")
    return make_mesh(data=len(devices) // model, model=model, devices=devices)

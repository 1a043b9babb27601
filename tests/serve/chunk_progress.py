"""Waiting for a running ``infer`` job to commit some chunks, for the resume tests that kill it mid-run."""

import json
import time


def chunks_done(state, process, at_least: int, timeout_s: float) -> int:
    """Poll the ``"done"`` count of an ``infer`` state file until it reaches ``at_least``, the process exits or
    ``timeout_s`` passes; returns the last count read (0 while the file is missing or being written)."""
    deadline, done = time.time() + timeout_s, 0
    while time.time() < deadline and process.poll() is None:
        try:
            done = json.loads(state.read_text())["done"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            done = 0
        if done >= at_least:
            break
        time.sleep(0.005)
    return done

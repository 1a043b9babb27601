"""``jaxopt-serve serve ARGS --port 0`` in a child process, for the tests that start the command itself."""

from __future__ import annotations

import signal
import subprocess
import sys


class ServeProcess:
    """Starts the command on entry and reads its first line (``line``; ``url``, ``host``, ``port``);
    ``stop()`` sends SIGTERM and returns the exit code, keeping ``out`` and ``err``; exit kills what is left."""

    def __init__(self, *args: str) -> None:
        self.args = [sys.executable, "-m", "jaxopt_serve", "serve", *args, "--port", "0"]
        self.out = self.err = ""

    def __enter__(self) -> ServeProcess:
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.line = self.process.stdout.readline()
        address = self.line.rsplit(" on http://", 1)[-1].split()[0] if " on http://" in self.line else ":0"
        self.url = f"http://{address}"
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        return self

    def stop(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        self.out, self.err = self.process.communicate(timeout=timeout)
        return self.process.returncode

    def __exit__(self, *exc: object) -> None:
        self.process.kill()
        self.process.wait()

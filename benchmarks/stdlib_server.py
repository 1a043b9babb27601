"""The benchmark baseline: the old standard-library HTTP endpoint (``ThreadingHTTPServer``, one thread per
connection, the batcher's blocking path), kept only so that ``serve_bench.py`` can measure the inference
server against it in the same run. Not part of the package; serve with ``jaxopt-serve serve``.

    python benchmarks/stdlib_server.py ARTIFACT --port 8001

Routes:
    ``POST /v1/predict``   body ``{"inputs": [[...], ...]}`` (JSON) or a ``.npy`` array
                           (``Content-Type: application/x-npy``); answers ``{"outputs": ...}``.
    ``GET /healthz``       ``{"status": "ok"}``.
"""

from __future__ import annotations

import io
import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from jaxopt_serve.engine.nonfinite import NanPolicy, check_policy, nonfinite_error, nonfinite_rows
from jaxopt_serve.serve.batcher import Closed, DynamicBatcher, Overloaded, RequestTimeout

NPY = "application/x-npy"


class PredictServer:
    """Serve ``batcher`` over HTTP on ``host:port`` (port 0: a free one, see ``.port``).

    ``nan_policy="error"`` (default) answers 400 to a request with a NaN or inf
    in any row, naming the rows; ``"propagate"`` hands it to the batcher.

    """

    def __init__(
        self,
        batcher: DynamicBatcher,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        max_body_bytes: int = 8 << 20,
        nan_policy: NanPolicy = "error",
    ) -> None:
        self.batcher = batcher
        self.nan_policy = check_policy(nan_policy)
        self.max_body_bytes = max_body_bytes
        handler = type("Handler", (_Handler,), {"app": self})
        self.httpd = _Server((host, port), handler)
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self._thread: threading.Thread | None = None
        self.stopping = False

    def start(self) -> PredictServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="jaxopt-serve-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        """Stop taking connections, then finish the batcher's accepted requests."""
        self.stopping = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self.batcher.close()


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the listen backlog: many clients may connect at once
    daemon_threads = True


class _Handler(BaseHTTPRequestHandler):
    app: PredictServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stall
    server_version = "jaxopt-serve"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep stderr quiet
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"))

    def _error(self, status: int, reason: str) -> None:
        self._json(status, {"error": reason})

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/healthz":
            if self.app.stopping:
                self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "stopping"})
            else:
                self._json(HTTPStatus.OK, {"status": "ok"})
        elif self.path == "/v1/metrics":
            self._json(HTTPStatus.OK, self.app.batcher.metrics.snapshot())
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}; try POST /v1/predict, GET /healthz, /metrics")

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/v1/predict":
            self._drain_and_error(HTTPStatus.NOT_FOUND, f"no route {self.path}")
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
            return
        if int(length) > self.app.max_body_bytes:
            self.close_connection = True  # the body is not read
            self._error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body of {int(length)} bytes exceeds the limit of {self.app.max_body_bytes}",
            )
            return
        body = self.rfile.read(int(length))
        content_type = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip()
        try:
            x = _parse(body, content_type)
        except _BadRequest as err:
            self._error(err.status, str(err))
            return
        wanted = self.app.batcher.engine.input_dtype
        if content_type == "application/json" and x.dtype.kind in "biu" and wanted.kind == "f":
            x = x.astype(wanted)  # JSON has one number type: 0 and 0.0 are the same input
        bad = nonfinite_rows(x) if self.app.nan_policy == "error" else None
        if bad is not None:
            self._error(HTTPStatus.BAD_REQUEST, str(nonfinite_error(bad)))
            return
        try:
            out = self.app.batcher.predict(x)
        except ValueError as err:
            self._error(HTTPStatus.BAD_REQUEST, str(err))
            return
        except (Overloaded, Closed) as err:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(err))
            return
        except RequestTimeout as err:
            self._error(HTTPStatus.GATEWAY_TIMEOUT, str(err))
            return
        except Exception as err:  # noqa: BLE001
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(err).__name__}: {err}")
            return
        if NPY in (self.headers.get("Accept") or ""):
            buffer = io.BytesIO()
            np.save(buffer, out, allow_pickle=False)
            self._send(HTTPStatus.OK, buffer.getvalue(), NPY)
        else:
            self._json(HTTPStatus.OK, {"outputs": out.tolist()})

    def _drain_and_error(self, status: int, reason: str) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= self.app.max_body_bytes:
            self.rfile.read(int(length))
        else:
            self.close_connection = True
        self._error(status, reason)


class _BadRequest(ValueError):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _parse(body: bytes, content_type: str) -> np.ndarray:
    if content_type in (NPY, "application/octet-stream"):
        try:
            x = np.load(io.BytesIO(body), allow_pickle=False)
        except Exception as err:  # noqa: BLE001 - any malformed .npy
            raise _BadRequest(HTTPStatus.BAD_REQUEST, f"body is not a valid .npy array: {err}") from None
        if not isinstance(x, np.ndarray):
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "body must be a single .npy array, not an .npz archive")
        return x
    if content_type != "application/json":
        raise _BadRequest(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type {content_type!r} is not supported; send application/json or {NPY}",
        )
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _BadRequest(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {err}") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise _BadRequest(HTTPStatus.BAD_REQUEST, 'JSON body must be an object with an "inputs" array')
    try:
        x = np.asarray(payload["inputs"])
    except ValueError as err:
        raise _BadRequest(HTTPStatus.BAD_REQUEST, f'"inputs" is not a rectangular array: {err}') from None
    if x.dtype.kind not in "biuf":
        raise _BadRequest(HTTPStatus.BAD_REQUEST, f'"inputs" must hold numbers, got {x.dtype} values')
    return x


def main() -> None:
    import argparse

    from jaxopt_serve.artifact import load_artifact
    from jaxopt_serve.engine import InferenceEngine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-batch", type=int, default=64)
    args = parser.parse_args()
    artifact = load_artifact(args.artifact)
    engine = InferenceEngine(
        artifact.config, artifact.variables, input_shape=artifact.input_shape, max_batch=args.max_batch
    ).warmup()
    server = PredictServer(DynamicBatcher(engine, max_queue=4096), port=args.port)
    print(f"serving {args.artifact} on http://127.0.0.1:{server.port} (POST /v1/predict)", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

"""The REST adapter: KServe v2 / Open Inference Protocol routes over a ``DataPlane``.

Each route translates the wire format and calls the data plane; errors are mapped once, by
``errors.to_status``. Decoding and encoding large JSON bodies runs in a worker thread so the
event loop keeps serving other requests.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from mpsserve.dataplane import DataPlane, request_id_for
from mpsserve.errors import InvalidInput, MpsServeError, to_status
from mpsserve.protocol import kserve, tfserving
from mpsserve.types import InferRequest, InferResponse

OFFLOAD_BYTES = 64 * 1024  # JSON above this is (de)serialised off the event loop
JSON_BYTES_PER_ELEMENT = 20  # rough size of one number written as JSON
REQUEST_ID = "X-Request-ID"


async def _error_response(_request: Request, exc: Exception) -> Response:
    status, _, message = to_status(exc)
    return Response(kserve.encode_error(message), status, media_type="application/json")


def _parse_header_length(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InvalidInput(f"header {kserve.HEADER_LENGTH} is {raw!r}, not an integer") from None


def _v2_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Our numpy dtype names -> v2 datatypes; extra keys pass through."""

    def tensor(spec: dict[str, Any]) -> dict[str, Any]:
        datatype = kserve.numpy_to_datatype(spec["dtype"])
        return {"name": spec["name"], "datatype": datatype, "shape": spec["shape"]}

    out = dict(metadata)
    out["inputs"] = [tensor(s) for s in metadata["inputs"]]
    out["outputs"] = [tensor(s) for s in metadata["outputs"]]
    return out


async def _offload(size: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
    if size > OFFLOAD_BYTES:
        return await run_in_threadpool(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def _json_output_bytes(result: InferResponse, request: InferRequest) -> int:
    """Estimated JSON size of the outputs that travel as JSON (binary ones cost little)."""
    elements = sum(
        array.size for name, array in result.outputs.items() if not request.wants_binary(name)
    )
    return elements * JSON_BYTES_PER_ELEMENT


INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class InferRoute:
    """ASGI: ``POST /v2/models/{name}[/versions/{v}]/infer`` straight on uvicorn, the rest to
    ``app``. The body lands in one preallocated buffer (the binary tensors are views on it)
    and no framework layer runs: measured, FastAPI's stack and its body joins were over half
    of the ingress's CPU for a 2000-row request."""

    def __init__(self, app: Any, dataplane: DataPlane) -> None:
        self.app, self.dataplane = app, dataplane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = INFER_PATH.fullmatch(scope["path"]) if scope["type"] == "http" else None
        if match is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get(REQUEST_ID.lower())
        try:
            payload, response_headers, request_id = await self._infer(
                match.group(1), match.group(2), headers, receive, request_id
            )
            status = 200
        except Exception as exc:
            status, _, message = to_status(exc)
            payload, response_headers = (
                kserve.encode_error(message),
                {"Content-Type": "application/json"},
            )
        if request_id:
            response_headers[REQUEST_ID] = request_id
        response_headers["Content-Length"] = str(len(payload))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in response_headers.items()],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def _infer(
        self,
        name: str,
        version: str | None,
        headers: dict[str, str],
        receive: Receive,
        request_id: str | None,
    ) -> tuple[bytes, dict[str, str], str]:
        dataplane, started = self.dataplane, time.perf_counter()
        try:
            dataplane.backend(name)  # unknown model: 404 before reading the body
            declared = headers.get("content-length", "")
            if declared.isdigit():
                dataplane.check_size(int(declared))
            body = await _read_body(receive, int(declared) if declared.isdigit() else None)
            dataplane.check_size(len(body))
            header_length = _parse_header_length(headers.get(kserve.HEADER_LENGTH.lower()))
            decoded = await _offload(  # binary tensors are views: only JSON is worth a thread
                len(body) if header_length is None else header_length,
                kserve.decode_infer_request,
                body,
                model=name,
                version=version,
                header_length=header_length,
            )
        except MpsServeError as exc:
            dataplane.rejected(name, "http", request_id, exc, started)
            raise
        request_id = request_id_for(request_id, decoded.id)
        result = await dataplane.infer(decoded, "http", request_id)
        payload, response_headers = await _offload(
            _json_output_bytes(result, decoded), kserve.encode_infer_response, result, decoded
        )
        return payload, response_headers, request_id


async def _read_body(receive: Receive, size: int | None) -> bytearray:
    """The request body in one writable buffer, allocated once when its size is declared."""
    body = bytearray(size or 0)
    filled = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidInput("the client closed the connection before sending the body")
        chunk = message.get("body", b"")
        if size is not None and filled + len(chunk) <= size:
            body[filled : filled + len(chunk)] = chunk
        else:
            body[filled:] = chunk
        filled += len(chunk)
        if not message.get("more_body", False):
            break
    if size is not None and filled != size:
        raise InvalidInput(f"request body is {filled} bytes; Content-Length said {size}")
    return body


def _ready_response(ready: bool) -> Response:
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


def create_http_app(dataplane: DataPlane) -> Any:
    """The REST ASGI app: v2 inference on the fast route, everything else through FastAPI."""
    return InferRoute(_framework_app(dataplane), dataplane)


def _framework_app(dataplane: DataPlane) -> FastAPI:
    app = FastAPI(title="mpsserve", docs_url=None, redoc_url=None)
    app.add_exception_handler(MpsServeError, _error_response)
    app.add_exception_handler(Exception, _error_response)

    @app.get("/v2/health/live")
    async def live() -> Response:
        return JSONResponse({"live": dataplane.live()})

    @app.get("/-/healthz")  # what KubeRay's injected probes and Serve's proxy answer
    async def healthz() -> Response:
        ready = await dataplane.ready()
        return Response("success" if ready else "not ready", 200 if ready else 503)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return _ready_response(await dataplane.ready())

    @app.get("/v2")
    async def server_metadata() -> Response:
        return JSONResponse(dataplane.server_metadata())

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> Response:
        return JSONResponse(_v2_metadata(await dataplane.model_metadata(name, version)))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        return _ready_response(await dataplane.model_ready(name, version))

    _add_tfserving_routes(app, dataplane)
    return app


def _add_tfserving_routes(app: FastAPI, dataplane: DataPlane) -> None:
    """TensorFlow Serving's REST API, so a team migrating keeps its client unchanged."""

    @app.get("/v1/models/{name}")
    @app.get("/v1/models/{name}/versions/{version}")
    async def tfs_status(name: str, version: str | None = None) -> Response:
        metadata = await dataplane.model_metadata(name, version)
        return JSONResponse(tfserving.model_status(metadata["versions"]))

    @app.post("/v1/models/{name}:predict")
    @app.post("/v1/models/{name}/versions/{version}:predict")
    async def tfs_predict(name: str, request: Request, version: str | None = None) -> Response:
        started = time.perf_counter()
        request_id = request_id_for(request.headers.get(REQUEST_ID), None)
        try:
            dtypes = await dataplane.input_dtypes(name)
            body = await request.body()
            dataplane.check_size(len(body))
            decoded, rows = await _offload(
                len(body),
                tfserving.decode_predict,
                body,
                model=name,
                version=version,
                dtypes=dtypes,
            )
        except MpsServeError as exc:
            dataplane.rejected(name, "tfserving", request_id, exc, started)
            raise
        result = await dataplane.infer(decoded, "tfserving", request_id)
        size = _json_output_bytes(result, decoded)  # every TF-Serving output is JSON
        payload = await _offload(size, tfserving.encode_predict, result, rows)
        return Response(payload, media_type="application/json", headers={REQUEST_ID: request_id})

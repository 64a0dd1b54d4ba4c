"""The REST adapter: KServe v2 / Open Inference Protocol routes over a ``DataPlane``.

Each route translates the wire format and calls the data plane; errors are mapped once, by
``errors.to_status``. Decoding and encoding large JSON bodies runs in a worker thread so the
event loop keeps serving other requests.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from mpsserve.errors import InvalidInput, MpsServeError, to_status
from mpsserve.ingress.dataplane import DataPlane, client_request_id, request_id_for
from mpsserve.protocol import kserve, tensors, tfserving, tfserving_grpc
from mpsserve.text import quote
from mpsserve.types import InferRequest, InferResponse

OFFLOAD_BYTES = 64 * 1024  # JSON above this is (de)serialised off the event loop
JSON_BYTES_PER_ELEMENT = 20  # rough size of one number written as JSON
REQUEST_ID = "X-Request-ID"


def _error_headers(exc: BaseException, retry_after_s: int) -> dict[str, str]:
    """Headers of an error answer: a Retry-After on transient refusals (shed load)."""
    if getattr(exc, "retry_after", False):
        return {"Retry-After": str(retry_after_s)}
    return {}


def _error_handler(retry_after_s: int) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handle(_request: Request, exc: Exception) -> Response:
        status, _, message = to_status(exc)
        headers = _error_headers(exc, retry_after_s)
        body = kserve.encode_error(message)
        return Response(body, status, headers=headers, media_type="application/json")

    return handle


async def _framework_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, wrong method) in the ``{"error": ...}`` body
    every other error has, which every client decodes (tritonclient reads ``error``)."""
    headers = getattr(exc, "headers", None)
    if isinstance(exc, RequestValidationError):
        status, message = 400, "the request does not match the route's parameters"
    else:
        status = getattr(exc, "status_code", 500)
        message = _refusal(status, request.method, request.url.path, (headers or {}).get("Allow"))
    body = kserve.encode_error(message)
    return Response(body, status, headers=headers, media_type="application/json")


def _refusal(status: int, method: str, path: str, allow: str | None) -> str:
    """The message of a framework refusal; the client's path is quoted and bounded."""
    where = f"{quote(method, 16)} {quote(path, 100)}"
    if status == 404:
        return f"no endpoint {where} (the README lists the API)"
    if status == 405:
        return f"method not allowed: {where}; allowed: {allow or 'see the README'}"
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


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
        datatype = tensors.numpy_to_datatype(spec["dtype"])
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
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class InferRoute:
    """ASGI: ``POST /v2/models/{name}[/versions/{v}]/infer`` straight on uvicorn, the rest to
    ``app``. The body lands in one preallocated buffer (the binary tensors are views on it)
    and no framework layer runs: measured, FastAPI's stack and its body joins were over half
    of the ingress's CPU for a 2000-row request."""

    def __init__(self, app: Any, dataplane: DataPlane, retry_after_s: int = 1) -> None:
        self.app, self.dataplane, self.retry_after_s = app, dataplane, retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = INFER_PATH.fullmatch(scope["path"]) if scope["type"] == "http" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            await _not_allowed(scope, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = client_request_id(headers.get(REQUEST_ID.lower()))
        try:
            with self.dataplane.admission(match.group(1), "http", request_id):
                payload, response_headers, request_id = await self._infer(
                    match.group(1), match.group(2), headers, receive, request_id
                )
            status = 200
        except Exception as exc:
            status, _, message = to_status(exc)
            payload = kserve.encode_error(message)
            response_headers = {
                "Content-Type": "application/json",
                **_error_headers(exc, self.retry_after_s),
            }
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
            body = await read_body(receive, headers.get("content-length"), dataplane)
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


async def _not_allowed(scope: Scope, send: Send) -> None:
    """405 for an inference path asked with another method (``GET .../infer``)."""
    message = _refusal(405, scope["method"], scope["path"], "POST")
    payload = kserve.encode_error(message)
    headers = [
        (b"content-type", b"application/json"),
        (b"allow", b"POST"),
        (b"content-length", str(len(payload)).encode()),
    ]
    await send({"type": "http.response.start", "status": 405, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def read_body(
    receive: Receive, content_length: str | None, dataplane: DataPlane
) -> bytearray:
    """The request body in one writable buffer, refused (413) as soon as it is known to be
    over the limit: at a declared Content-Length, else at the chunk that crosses it (chunked
    uploads). Chunks are kept as they arrive and joined once, so memory follows the bytes
    received, never a size a client merely claims (measured before: 40 connections claiming
    60 MB each and sending 20 KB cost 2.3 GB)."""
    declared = int(content_length) if content_length and content_length.isdigit() else None
    if declared is not None:
        dataplane.check_size(declared)
    chunks: list[bytes] = []
    filled = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidInput("the client closed the connection before sending the body")
        chunk = message.get("body", b"")
        filled += len(chunk)
        dataplane.check_size(filled)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    if declared is not None and filled != declared:
        raise InvalidInput(f"request body is {filled} bytes; Content-Length said {declared}")
    return bytearray().join(chunks)


def _ready_response(ready: bool) -> Response:
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


def create_http_app(dataplane: DataPlane, retry_after_s: int = 1, api_docs: bool = False) -> Any:
    """The REST ASGI app: v2 inference on the fast route, everything else through FastAPI
    (whose /openapi.json, /docs and /redoc exist only with ``api_docs``)."""
    return InferRoute(_framework_app(dataplane, retry_after_s, api_docs), dataplane, retry_after_s)


def _framework_app(dataplane: DataPlane, retry_after_s: int, api_docs: bool) -> FastAPI:
    pages: dict[str, Any] = {} if api_docs else {"openapi_url": None, "docs_url": None}
    app = FastAPI(title="mpsserve", redoc_url="/redoc" if api_docs else None, **pages)
    app.add_exception_handler(MpsServeError, _error_handler(retry_after_s))
    app.add_exception_handler(Exception, _error_handler(retry_after_s))
    app.add_exception_handler(HTTPException, _framework_error)
    app.add_exception_handler(RequestValidationError, _framework_error)
    _add_triton_routes(app, dataplane)  # first: /v2/models/stats before /v2/models/{name}

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
    _add_tfserving_metadata_routes(app, dataplane)
    return app


def _add_triton_routes(app: FastAPI, dataplane: DataPlane) -> None:
    """Triton's extensions: model configuration, statistics, the model repository."""
    extensions = dataplane.extensions

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str | None = None) -> Response:
        return JSONResponse(await extensions.model_config(name, version))

    @app.get("/v2/models/stats")
    @app.get("/v2/models/{name}/stats")
    @app.get("/v2/models/{name}/versions/{version}/stats")
    async def model_stats(name: str | None = None, version: str | None = None) -> Response:
        return JSONResponse({"model_stats": await extensions.statistics(name, version)})

    @app.post("/v2/repository/index")
    async def repository_index(request: Request) -> Response:
        ready = (await _json_body(request)).get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInput('"ready" must be a boolean')
        return JSONResponse(await extensions.index(ready_only=ready))

    @app.post("/v2/repository/models/{name}/load")
    async def repository_load(name: str, request: Request) -> Response:
        await extensions.load(name, await _parameters(request))
        return Response(b"", 200)

    @app.post("/v2/repository/models/{name}/unload")
    async def repository_unload(name: str, request: Request) -> Response:
        await extensions.unload(name, await _parameters(request))
        return Response(b"", 200)


async def _json_body(request: Request) -> dict[str, Any]:
    """A small JSON body (an empty one is ``{}``), bounded like every route's."""
    body = await request.body()
    return kserve.parse_json_object(body) if body.strip() else {}


async def _parameters(request: Request) -> dict[str, Any]:
    parameters = (await _json_body(request)).get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInput('"parameters" must be a JSON object')
    return parameters


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
        request_id = request_id_for(request.headers.get(REQUEST_ID), None)
        with dataplane.admission(name, "tfserving", request_id):
            return await _tfs_predict(dataplane, name, version, request, request_id)


def _add_tfserving_metadata_routes(app: FastAPI, dataplane: DataPlane) -> None:
    """TF Serving's REST metadata (its JSON shape, ``tfserving_grpc.metadata_json``); its
    version-label routes answer that labels are not supported."""

    @app.get("/v1/models/{name}/metadata")
    @app.get("/v1/models/{name}/versions/{version}/metadata")
    async def tfs_metadata(name: str, version: str | None = None) -> Response:
        metadata = await dataplane.model_metadata(name, version)
        return JSONResponse(tfserving_grpc.metadata_json(metadata))

    @app.get("/v1/models/{name}/labels/{label}")
    @app.get("/v1/models/{name}/labels/{label}/metadata")
    @app.post("/v1/models/{name}/labels/{label}:predict")
    async def tfs_label(name: str, label: str) -> Response:
        dataplane.backend(name)  # an unknown model is still a 404
        raise InvalidInput(tfserving_grpc.LABELS_UNSUPPORTED.format(label=quote(label)))


async def _tfs_predict(
    dataplane: DataPlane, name: str, version: str | None, request: Request, request_id: str
) -> Response:
    """One TF-Serving predict: the body read as it arrives, bounded like every route's."""
    started = time.perf_counter()
    try:
        dataplane.backend(name)  # unknown model: 404 before reading the body
        body = await read_body(request.receive, request.headers.get("content-length"), dataplane)
        dtypes = await dataplane.input_dtypes(name)
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

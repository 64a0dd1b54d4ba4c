"""The REST adapter: KServe v2 / Open Inference Protocol routes over a ``DataPlane``.

Each route translates the wire format and calls the data plane; errors are mapped once, by
``errors.to_status``. Decoding and encoding large JSON bodies runs in a worker thread so the
event loop keeps serving other requests.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from mpsserve.dataplane import DataPlane, new_request_id
from mpsserve.errors import InvalidInput, MpsServeError, to_status
from mpsserve.protocol import kserve, tfserving
from mpsserve.types import InferRequest, InferResponse

OFFLOAD_BYTES = 64 * 1024  # JSON above this is (de)serialised off the event loop
JSON_BYTES_PER_ELEMENT = 20  # rough size of one number written as JSON
REQUEST_ID = "X-Request-ID"


async def _error_response(_request: Request, exc: Exception) -> Response:
    status, _, message = to_status(exc)
    return Response(kserve.encode_error(message), status, media_type="application/json")


def _header_length(request: Request) -> int | None:
    raw = request.headers.get(kserve.HEADER_LENGTH)
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


def _request_id(request: Request, body_id: str | None) -> str:
    """The client's X-Request-ID, else the body's ``id``, else a new one (echoed back)."""
    return request.headers.get(REQUEST_ID) or body_id or new_request_id()


def _ready_response(ready: bool) -> Response:
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


def create_http_app(dataplane: DataPlane) -> FastAPI:
    app = FastAPI(title="mpsserve", docs_url=None, redoc_url=None)
    app.add_exception_handler(MpsServeError, _error_response)
    app.add_exception_handler(Exception, _error_response)

    @app.get("/v2/health/live")
    async def live() -> Response:
        return JSONResponse({"live": dataplane.live()})

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

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        dataplane.backend(name)  # unknown model: 404 before reading the body
        declared = request.headers.get("content-length")
        if declared and declared.isdigit():
            dataplane.check_size(int(declared))
        body = await request.body()
        dataplane.check_size(len(body))
        header_length = _header_length(request)
        decoded = await _offload(  # binary tensors are views: only JSON is worth a thread
            len(body) if header_length is None else header_length,
            kserve.decode_infer_request,
            body,
            model=name,
            version=version,
            header_length=header_length,
        )
        request_id = _request_id(request, decoded.id)
        result = await dataplane.infer(decoded, "http", request_id)
        payload, headers = await _offload(
            _json_output_bytes(result, decoded), kserve.encode_infer_response, result, decoded
        )
        return Response(payload, headers={**headers, REQUEST_ID: request_id})

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
        dtypes = await dataplane.input_dtypes(name)
        body = await request.body()
        dataplane.check_size(len(body))
        decoded, rows = await _offload(
            len(body), tfserving.decode_predict, body, model=name, version=version, dtypes=dtypes
        )
        request_id = _request_id(request, None)
        result = await dataplane.infer(decoded, "tfserving", request_id)
        size = _json_output_bytes(result, decoded)  # every TF-Serving output is JSON
        payload = await _offload(size, tfserving.encode_predict, result, rows)
        return Response(payload, media_type="application/json", headers={REQUEST_ID: request_id})

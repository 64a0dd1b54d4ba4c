"""What the one gRPC error interceptor costs per call: server CPU, with and without it.

A grpc.aio server in its own process answers a trivial unary method three ways: plain, behind
``ingress.grpc.ErrorInterceptor`` (what the ingress runs), and with the method wrapped once
at registration (the cheapest place errors could be mapped); 4 client threads over 4 channels
call it; the server's CPU seconds (/proc) per call are printed per round. The trivial method
is the worst case: a real inference costs the ingress ~1 ms of CPU.

    python -m benchmarks.grpc_error_mapping_cost [--calls 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from benchmarks.loadgen import read_proc_stat

MODES = ("plain", "interceptor", "wrapped")


def _identity(data: bytes) -> bytes:
    return data


def _serve(mode: str, ports: Any) -> None:
    from mpsserve.ingress.grpc import ErrorInterceptor, map_errors

    async def method(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "t.S",
        {
            "Do": grpc.unary_unary_rpc_method_handler(
                map_errors(method) if mode == "wrapped" else method, _identity, _identity
            )
        },
    )

    async def main() -> None:
        interceptors = [ErrorInterceptor()] if mode == "interceptor" else None
        server = grpc.aio.server(interceptors=interceptors)
        server.add_generic_rpc_handlers((handler,))
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _cpu_s(pid: int) -> float:
    return read_proc_stat(str(pid))[1] / os.sysconf("SC_CLK_TCK")


def measure(mode: str, calls: int, threads: int = 4) -> float:
    """Server CPU microseconds per call."""
    ports: Any = mp.Queue()
    server = mp.Process(target=_serve, args=(mode, ports), daemon=True)
    server.start()
    port = ports.get(timeout=30)
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(threads)]
    stubs = [c.unary_unary("/t.S/Do", _identity, _identity) for c in channels]

    def work(stub: Any, count: int) -> None:
        for _ in range(count):
            stub(b"x" * 100, timeout=10)

    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, stubs, [200] * threads))  # warm-up
            before = _cpu_s(server.pid or 0)
            list(pool.map(work, stubs, [calls] * threads))
        return 1e6 * (_cpu_s(server.pid or 0) - before) / (threads * calls)
    finally:
        for channel in channels:
            channel.close()
        server.terminate()
        server.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per client thread")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    seen: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in MODES:
            seen[mode].append(measure(mode, args.calls))
            print(f"round {round_}: {mode:11s} {seen[mode][-1]:7.1f} us of server CPU per call")
    for mode in MODES:
        print(f"median {mode:11s} {statistics.median(seen[mode]):7.1f} us per call")


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"({time.monotonic() - started:.0f} s)")

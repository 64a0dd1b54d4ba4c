"""Steady closed-loop load from client processes; every outcome streamed back with its times."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.loadgen import check_http_reply, http_body, split_concurrency
from mpsserve.ops.demo import DemoSpec, make_request
from mpsserve.protocol.kserve import HEADER_LENGTH

OK = "200"
ERROR_PAUSE_S = 0.1  # a worker pauses after a failure, so a dead port is not spun on
FLUSH_S = 0.25
SEED_STRIDE = 10_000  # request k of process i is make_request(seed=i * SEED_STRIDE + k)
Outcome = tuple[float, float, str, str | None]  # sent, done (monotonic), status, model_version


@dataclass(frozen=True)
class LoadConfig:
    url: str  # the infer URL
    rows: int
    timeout_s: float
    bodies: int


def reply_version(payload: bytes, header_length: str | None) -> str | None:
    try:
        header = payload[: int(header_length)] if header_length else payload
        return str(json.loads(header)["model_version"])
    except (ValueError, KeyError, TypeError):
        return None


async def send_one(session: Any, url: str, body: Any, rows: int) -> tuple[str, str | None]:
    data, headers = body
    try:
        async with session.post(url, data=data, headers=headers) as reply:
            payload = await reply.read()
            length = reply.headers.get(HEADER_LENGTH)
            if reply.status != 200:
                return str(reply.status), None
            if check_http_reply(payload, length, rows) is not None:
                return "bad-reply", None
            return OK, reply_version(payload, length)
    except TimeoutError:
        return "timeout", None
    except Exception as exc:  # a transport failure is an outcome, named by its class
        return type(exc).__name__, None


async def load_loop(config: LoadConfig, index: int, workers: int, queue: Any, stop: Any) -> None:
    import aiohttp

    spec, first, rows, parent = DemoSpec(), index * SEED_STRIDE, config.rows, os.getppid()
    bodies = [http_body(make_request(spec, config.rows, first + k)) for k in range(config.bodies)]
    outcomes: list[Outcome] = []

    async def worker(k: int) -> None:
        while True:
            sent = time.monotonic()
            status, version = await send_one(session, config.url, bodies[k % len(bodies)], rows)
            outcomes.append((sent, time.monotonic(), status, version))
            k += 1
            if status != OK:
                await asyncio.sleep(ERROR_PAUSE_S)

    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(worker(w)) for w in range(workers)]
        while not stop.is_set() and os.getppid() == parent:  # an orphan stops sending
            await asyncio.sleep(FLUSH_S)
            batch, outcomes[:] = outcomes[:], []
            if batch:
                queue.put(batch)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def load_process(config: LoadConfig, index: int, workers: int, queue: Any, stop: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator handles Ctrl-C
    asyncio.run(load_loop(config, index, workers, queue, stop))


class Load:
    """The client processes and every outcome they reported, in arrival order."""

    def __init__(self, config: LoadConfig, concurrency: int, processes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.queue: Any = ctx.Queue()
        self.stop: Any = ctx.Event()
        split = [n for n in split_concurrency(concurrency, processes) if n]
        self.procs = [
            ctx.Process(
                target=load_process, args=(config, i, n, self.queue, self.stop), daemon=True
            )
            for i, n in enumerate(split)
        ]
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.drainer = threading.Thread(target=self._drain, daemon=True)

    def start(self) -> None:
        for proc in self.procs:
            proc.start()
        self.drainer.start()

    def _drain(self) -> None:
        while (batch := self.queue.get()) is not None:
            with self.lock:
                self.outcomes.extend(batch)

    def done_between(self, start: float, end: float) -> list[Outcome]:
        with self.lock:
            return [o for o in self.outcomes if start <= o[1] < end]

    def close(self) -> None:
        self.stop.set()
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
        self.queue.put(None)
        self.drainer.join(5)

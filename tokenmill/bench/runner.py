"""Issue one run's requests in the requested load shape and collect their records.

Closed loop: `concurrency` workers, each sending its next request as soon as
its previous one ended. Open loop: a dispatcher sends request i at its arrival
time (gaps drawn from a gamma distribution of mean 1/rate and shape
`burstiness`; shape 1 is a Poisson process), capped at `concurrency` in flight
when set. Either way the run stops issuing after `request_limit` requests or
`duration` seconds, and waits for those in flight (each bounded by the request
timeout), so every loop ends. Request i is always `make_request(i)`.
"""
from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm

from tokenmill.bench.client import RequestRecord, StreamingClient
from tokenmill.bench.config import LoadShape
from tokenmill.bench.workload import RequestSpec

RequestMaker = Callable[[int], RequestSpec]


@dataclass
class RunRecords:
    records: list[RequestRecord]
    peak_in_flight: int


class _InFlight:
    __slots__ = ("now", "peak")

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0


async def _send(client: StreamingClient, make_request: RequestMaker, index: int, in_flight: _InFlight,
                records: list[RequestRecord], bar: tqdm) -> None:
    spec = make_request(index)
    in_flight.now += 1
    in_flight.peak = max(in_flight.peak, in_flight.now)
    try:
        records.append(await client.send(spec, index))
    finally:
        in_flight.now -= 1
    bar.update()


async def run_load(client: StreamingClient, make_request: RequestMaker, load: LoadShape, seed: int,
                   progress: bool = False, label: str = "bench") -> RunRecords:
    limit = load.request_limit
    records: list[RequestRecord] = []
    in_flight = _InFlight()
    with tqdm(total=limit, desc=label, unit="req", disable=not progress, dynamic_ncols=True) as bar:
        start = time.perf_counter()
        deadline = start + load.duration if load.duration is not None else math.inf
        if load.request_rate is None:
            next_index = 0

            async def worker() -> None:
                nonlocal next_index
                while (limit is None or next_index < limit) and time.perf_counter() < deadline:
                    index = next_index
                    next_index += 1
                    await _send(client, make_request, index, in_flight, records, bar)

            await asyncio.gather(*(worker() for _ in range(load.concurrency)))
        else:
            await _open_loop(client, make_request, load, seed, limit, start, deadline, in_flight, records, bar)
    records.sort(key=lambda record: record.index)
    return RunRecords(records, in_flight.peak)


async def _open_loop(client: StreamingClient, make_request: RequestMaker, load: LoadShape, seed: int,
                     limit: int | None, start: float, deadline: float, in_flight: _InFlight,
                     records: list[RequestRecord], bar: tqdm) -> None:
    rng = random.Random(seed ^ 0x5EED)
    slots = asyncio.Semaphore(load.concurrency) if load.concurrency is not None else None
    tasks: set[asyncio.Task] = set()
    arrival = start
    index = 0

    async def send_in_slot(index: int) -> None:
        try:
            await _send(client, make_request, index, in_flight, records, bar)
        finally:
            if slots is not None:
                slots.release()

    try:
        while limit is None or index < limit:
            if index > 0 and not math.isinf(load.request_rate):
                arrival += rng.gammavariate(load.burstiness, 1.0 / (load.request_rate * load.burstiness))
            if arrival >= deadline:
                break
            delay = arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots is not None:
                await slots.acquire()
            if time.perf_counter() >= deadline:
                if slots is not None:
                    slots.release()
                break
            task = asyncio.create_task(send_in_slot(index))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            index += 1
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()

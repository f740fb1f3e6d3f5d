"""The /predict request path (serving/channel.py): requests queue in the kernel and a
free worker takes what is queued, bodies of any size cross processes intact, answers
find their own requests, a full queue makes senders wait (never fail), and a request no
worker answers ends in a 504."""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing as mp
import time

import pytest

from serving.channel import Channel, Request


@pytest.fixture
def channel():
    ch = Channel.open()
    yield ch
    ch.close()


async def _queued(channel: Channel, bodies: list[bytes], wait: float = 30.0) -> list:
    """Start one predict per body and return the tasks once every request has entered the
    channel (or is waiting for room in it)."""
    client = channel.client()
    tasks = [
        asyncio.create_task(client.predict(body, f"clip{i}.wav", time.perf_counter(), wait))
        for i, body in enumerate(bodies)
    ]
    await asyncio.sleep(0.2)
    return tasks


def _take(channel: Channel, max_items: int, extra_wait: float = 0.0) -> list:
    return channel.take(max_items, extra_wait, idle_wait=1.0)


def test_a_free_worker_takes_what_is_queued_up_to_the_batch_size(channel):
    async def main():
        tasks = await _queued(channel, [b"a" * n for n in range(1, 6)])
        first = await asyncio.to_thread(_take, channel, 3)
        rest = await asyncio.to_thread(_take, channel, 32)  # no waiting to fill a batch
        assert [r.name for r in first] == ["clip0.wav", "clip1.wav", "clip2.wav"]
        assert [r.audio for r in rest] == [b"a" * 4, b"a" * 5]
        assert all(r.t_got >= r.t_submit for r in first + rest)
        # Answered out of order: each answer still reaches its own request.
        channel.answer(
            (r, 200, json.dumps({"n": len(r.audio)}).encode(), (r.t_got,) * 7)
            for r in reversed(first + rest)
        )
        return await asyncio.gather(*tasks)

    answers = asyncio.run(main())
    assert [(status, json.loads(body)["n"]) for status, body, _ in answers] == [
        (200, n) for n in range(1, 6)
    ]
    assert channel.take(32, 0.0, idle_wait=0.01) == []  # an empty channel gives nothing


def test_a_full_queue_makes_senders_wait_in_order(channel):
    # The kernel queues ~10 requests (net.unix.max_dgram_qlen); the other 30 wait in the
    # sender until a worker makes room.
    async def main():
        tasks = await _queued(channel, [str(i).encode() for i in range(40)])
        assert not any(t.done() for t in tasks)  # waiting, not failed
        taken = []
        while len(taken) < 40:
            batch = await asyncio.to_thread(_take, channel, 8)
            channel.answer((r, 200, r.audio, (0.0,) * 7) for r in batch)
            taken += batch
        return [r.audio for r in taken], await asyncio.gather(*tasks)

    order, answers = asyncio.run(main())
    assert order == [str(i).encode() for i in range(40)]
    assert [body for _, body, _ in answers] == order


def test_an_unanswered_request_gets_a_504_and_a_late_answer_is_dropped(channel):
    async def main():
        (task,) = await _queued(channel, [b"lost"], wait=0.5)
        (request,) = await asyncio.to_thread(_take, channel, 1)
        status, body, _ = await task  # the worker "died" holding it
        channel.answer([(request, 200, b"{}", (0.0,) * 7)])  # too late: nobody waits for it
        await asyncio.sleep(0.1)
        return status, json.loads(body)

    status, body = asyncio.run(main())
    assert status == 504 and "No inference worker answered within 0.5 s" in body["error"]


def _echo_digests(channel: Channel, count: int) -> None:
    """A worker in another process: answers each request with its body's sha256."""
    done = 0
    while done < count:
        batch = channel.take(8, 0.0, idle_wait=1.0)
        channel.answer((r, 200, hashlib.sha256(r.audio).hexdigest().encode(), ()) for r in batch)
        done += len(batch)


def test_bodies_of_any_size_cross_processes_intact(channel):
    bodies = [b"", b"RIFF" + bytes(range(256)) * 625, bytes(8 << 20)]  # 0 B, 160 kB, 8 MiB
    worker = mp.get_context("spawn").Process(
        target=_echo_digests, args=(channel, len(bodies)), daemon=True
    )
    worker.start()  # the channel (its socket included) is pickled to the worker

    async def main():
        client = channel.client()
        return await asyncio.gather(
            *(client.predict(body, "b.wav", time.perf_counter(), 60) for body in bodies)
        )

    try:
        answers = asyncio.run(main())
    finally:
        worker.join(timeout=30)
        if worker.is_alive():
            worker.kill()
    assert [body for _, body, _ in answers] == [
        hashlib.sha256(b).hexdigest().encode() for b in bodies
    ]


def test_answers_too_big_for_one_datagram_are_split_and_one_too_big_is_a_500(channel):
    # A datagram holds at most the socket's send buffer (~208 kB by default on Linux).
    bodies = [b"%d" % i + b"x" * 20_000 for i in range(40)] + [b"y" * 400_000]

    async def main():
        tasks = await _queued(channel, bodies)
        taken = []
        while len(taken) < len(bodies):
            batch = await asyncio.to_thread(_take, channel, 64)
            taken += batch
        # One batch's answers, 1.2 MB together: sent to the HTTP process in pieces.
        await asyncio.to_thread(channel.answer, [(r, 200, r.audio, ()) for r in taken])
        return await asyncio.gather(*tasks)

    answers = asyncio.run(main())
    assert [(status, body) for status, body, _ in answers[:-1]] == [(200, b) for b in bodies[:-1]]
    status, body, _ = answers[-1]
    assert status == 500 and "too large" in json.loads(body)["error"]


def test_a_request_older_than_the_timeout_is_refused_with_a_504_undecoded(channel):
    from serving.settings import ServeSettings
    from serving.worker import FaultSenseAPI, Rejected
    from tests.test_serve_runtime import serve_config

    settings = ServeSettings.from_cfg(serve_config(["server.request_timeout=5"]))
    api = FaultSenseAPI(settings, channel)  # no setup: a stale request never reaches a model
    stale = Request("unused", 0, time.perf_counter() - 6.0, "old.wav", b"not audio", 0.0)
    refused = api.decode_request(stale).clip
    assert isinstance(refused, Rejected)
    assert refused.status == 504 and "more than 5 s" in refused.message

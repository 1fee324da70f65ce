"""Hand-offs from worker threads to the event loop: in order, all of them, with few wake-ups."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

import pytest

from sdgate.handoff import Handoff


def test_posts_from_threads_run_on_the_loop_in_order_with_one_wake_up_for_a_burst() -> None:
    async def main() -> tuple[list[int], set[int], int]:
        loop = asyncio.get_running_loop()
        handoff = Handoff(loop)
        seen: list[int] = []
        threads: set[int] = set()
        wakeups = 0
        original = loop.call_soon_threadsafe

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal wakeups
            wakeups += 1
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign,assignment]

        def record(i: int) -> None:
            seen.append(i)
            threads.add(threading.get_ident())

        def burst() -> None:  # a batch's eight results, reported back to back from the engine's thread
            for i in range(8):
                handoff.post(record, i)

        worker = threading.Thread(target=burst)
        worker.start()
        worker.join()  # all posted before the loop got to run any of them
        await asyncio.sleep(0.05)
        return seen, threads, wakeups

    seen, threads, wakeups = asyncio.run(main())
    assert seen == list(range(8))
    assert threads == {threading.get_ident()}  # asyncio.run's loop runs in this thread
    assert wakeups == 1


def test_a_failing_callback_does_not_starve_the_ones_after_it(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> list[str]:
        handoff = Handoff(asyncio.get_running_loop())
        seen: list[str] = []

        def boom() -> None:
            raise ValueError("boom")

        def post_both() -> None:
            handoff.post(boom)
            handoff.post(seen.append, "after")

        threading.Thread(target=post_both).start()
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        return seen

    assert asyncio.run(main()) == ["after"]
    assert "a callback handed to the event loop failed" in caplog.text


def test_wrap_carries_results_errors_and_leaves_a_canceled_waiter_alone() -> None:
    async def main() -> None:
        handoff = Handoff(asyncio.get_running_loop())
        ok: Future[int] = Future()
        bad: Future[int] = Future()
        dropped: Future[int] = Future()
        threading.Timer(0.01, ok.set_result, (7,)).start()
        threading.Timer(0.01, bad.set_exception, (KeyError("k"),)).start()
        assert await handoff.wrap(ok) == 7
        with pytest.raises(KeyError):
            await handoff.wrap(bad)
        waiter = handoff.wrap(dropped)
        waiter.cancel()
        dropped.set_result(1)  # settles after its waiter was canceled: nothing raises
        await asyncio.sleep(0.02)
        assert waiter.cancelled()
        done: Future[int] = Future()
        done.set_result(3)  # already done when wrapped (an engine that refused at once)
        assert await handoff.wrap(done) == 3

    asyncio.run(main())

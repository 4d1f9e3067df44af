"""Requests that arrive together are decoded together: one asyncio task drains a queue of requests in
rounds, each round one call of the decoder in the decoding thread (so the event loop keeps accepting;
torch releases the GIL in its kernels).

A round waits a short window after the first request of an idle spell, then takes lines from the
waiting requests that share one decoding settings, in turns (a line of each, then again), up to a token
budget: a request of a thousand lines is decoded over several rounds. The settings are those of the
request that has waited longest since it last had lines in a round, so a request that arrives
meanwhile is in the next round or the one after, whatever its settings, instead of waiting for all of
the long one. Each request's lines keep their order; the answer is complete when its last line has
been decoded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from seq2seq.decoding import DecodingSettings
from seq2seq.errors import UserError
from seq2seq.serve.protocol import RequestError

log = logging.getLogger(__name__)

T = TypeVar("T")
# decode(lines, settings, attention flags) -> one output per line, in order; runs in a worker thread.
Decode = Callable[[list[str], DecodingSettings, list[bool]], list[T]]


def decoding_thread() -> ThreadPoolExecutor:
    """The one thread that runs the server's torch operations, the model's loading included.

    Each thread that runs a parallel torch operation gets an OpenMP team of its own. With a second team
    (the model loaded on the main thread, decoded on another) a process has more OpenMP threads than
    cores, and libgomp then spins 100 times instead of 300,000 before a waiting thread sleeps
    (``GOMP_SPINCOUNT``): every operation of a beam step waits for its threads to wake. Decoding ran at
    1.1 cores and about half the speed (120-146 against 229-267 test verses a second on 2 cores). One
    thread also keeps torch's per-thread state and the allocator's arena to one (a pool's threads each
    grew the server's memory).
    """
    return ThreadPoolExecutor(1, thread_name_prefix="decoding")


@dataclass(eq=False)
class _Waiting(Generic[T]):
    """A request in the queue: its lines, their costs in source tokens, and how far it has got."""

    lines: Sequence[str]
    costs: Sequence[int]
    settings: DecodingSettings
    attention: bool
    done: asyncio.Future
    turn: int  # the rounds decoded when it arrived or last had lines in one: the lowest goes next
    outputs: list = field(default_factory=list)
    taken: int = 0  # lines handed to a round so far


class Batcher(Generic[T]):
    """The queue and its one decoding task.

    ``decode`` translates lines (in ``thread``, the :func:`decoding_thread` the model was loaded in,
    shut down when the batcher stops); ``costs(lines)`` gives each line's cost in source tokens;
    ``round_tokens(settings)`` is a round's budget of them; ``window`` (seconds) is how long the first
    request of an idle spell waits for others.
    """

    def __init__(
        self,
        decode: Decode,
        costs: Callable[[Sequence[str]], list[int]],
        round_tokens: Callable[[DecodingSettings], int],
        window: float,
        thread: ThreadPoolExecutor,
    ) -> None:
        self._decode = decode
        self._costs = costs
        self._round_tokens = round_tokens
        self._window = window
        self._waiting: list[_Waiting[T]] = []
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._thread = thread
        self.rounds = 0  # decoder calls so far
        self.lines = 0  # lines decoded so far

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="decoding")

    @property
    def alive(self) -> bool:
        """Whether the decoding task runs (a request would be answered)."""
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Stop the decoding task (after the server has answered the requests in flight)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._thread.shutdown()

    async def translate(self, lines: Sequence[str], settings: DecodingSettings, attention: bool) -> list[T]:
        """Queue ``lines`` and wait for their outputs, in order."""
        if not lines:
            return []
        if not self.alive:
            raise RequestError(
                503, "the decoding task has stopped: the server is stopping, or failed (its log says)"
            )
        done = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(lines, self._costs(lines), settings, attention, done, self.rounds))
        self._arrived.set()
        return await done

    async def _run(self) -> None:
        while True:
            if not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
                await asyncio.sleep(self._window)  # let the requests that arrive together meet
            self._waiting = [w for w in self._waiting if not w.done.done()]  # drop abandoned ones
            if self._waiting:
                await self._one_round()

    def _take_round(self) -> list[tuple[_Waiting[T], int]]:
        """(request, line index) pairs for one round: the requests with the settings of the one whose
        turn it is (the first of the lowest ``turn``), a line of each in turn, until the round's token
        budget is spent (at least one line)."""
        settings = min(self._waiting, key=lambda waiting: waiting.turn).settings
        members = [w for w in self._waiting if w.settings == settings]
        budget, spent = self._round_tokens(settings), 0
        taken: list[tuple[_Waiting[T], int]] = []
        while True:
            progressed = False
            for waiting in members:
                if waiting.taken == len(waiting.lines) or (taken and spent >= budget):
                    continue
                taken.append((waiting, waiting.taken))
                spent += waiting.costs[waiting.taken]
                waiting.taken += 1
                progressed = True
            if not progressed:
                return taken

    async def _one_round(self) -> None:
        taken = self._take_round()
        settings = taken[0][0].settings
        lines = [waiting.lines[i] for waiting, i in taken]
        flags = [waiting.attention for waiting, _ in taken]
        try:
            loop = asyncio.get_running_loop()
            outputs = await loop.run_in_executor(self._thread, self._decode, lines, settings, flags)
        except Exception as error:  # the requests of this round fail, the server stays up
            if isinstance(error, UserError):  # settings this model or device cannot decode with
                error = RequestError(400, str(error))
            else:  # a bug
                log.exception("decoding failed")
            for waiting in {id(w): w for w, _ in taken}.values():
                if not waiting.done.done():
                    waiting.done.set_exception(error)
            return
        self.rounds += 1
        self.lines += len(lines)
        for (waiting, _), output in zip(taken, outputs, strict=True):
            waiting.outputs.append(output)  # a request's lines are taken, and come back, in order
            waiting.turn = self.rounds
        for waiting in {id(w): w for w, _ in taken}.values():
            if len(waiting.outputs) == len(waiting.lines) and not waiting.done.done():
                waiting.done.set_result(waiting.outputs)

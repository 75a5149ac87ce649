"""The async engine: the engine loop on its own thread, one async stream of outputs per request.

The server (and anything else on an asyncio loop) calls `generate()`, iterates the outputs, and
an abandoned iterator (a client disconnect) aborts its request and frees its pages.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from jaxserve.engine.args import EngineArgs
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an internal error; the server must restart."""


class AsyncLLMEngine:
    """Runs `LLMEngine.step()` on a background thread and fans outputs out to asyncio queues."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopped = False
        self.dead_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="jaxserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> AsyncLLMEngine:
        return cls(LLMEngine(args))

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, *, prompt: str | None = None,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs until it finishes.

        Raises ValueError (before yielding) for a request the engine refuses.
        """
        if self.dead_error is not None:
            raise EngineDeadError("the engine loop has stopped") from self.dead_error
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, stream)
        reply: asyncio.Future = loop.create_future()
        self._commands.put(("add", request_id, prompt_token_ids, params, prompt, priority, reply))
        self._wake.set()
        # NOTE: a cancellation (client disconnect) can land while the add is still queued; the
        # abort queued behind it in `finally` then removes the request once it exists.
        refused = finished = False
        try:
            error = await reply
            if error is not None:
                refused = True  # never added: nothing to abort (and the id may be another's)
                raise error
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError("the engine loop has stopped") from item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and not refused:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ---- engine thread ------------------------------------------------------------------
    def _handle_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, request_id, ids, params, prompt, priority, reply = cmd
                error = None
                try:
                    self.engine.add_request(request_id, ids, params, prompt=prompt,
                                            priority=priority)
                except Exception as e:  # noqa: BLE001 - a bad request must not stop the loop
                    error = e
                _call_soon(reply.get_loop(), _resolve, reply, error)
            elif cmd[0] == "abort":
                self.engine.abort_request(cmd[1])

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._handle_commands()
                if not self.engine.has_unfinished_requests():
                    self.engine.record_metrics()  # aborts may have freed pages
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
        except BaseException as e:  # noqa: BLE001 - the loop must report, never vanish
            logger.exception("engine loop failed")
            self.dead_error = e
            for request_id in list(self._streams):
                self._deliver(request_id, e)

    def _deliver(self, request_id: str, item) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            loop, stream = entry
            _call_soon(loop, stream.put_nowait, item)


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if not future.done():  # the waiting request may have been cancelled meanwhile
        future.set_result(error)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """Hand `fn(*args)` to an event loop from the engine thread; a closed loop is ignored."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass

"""Requests from the trainer to an engine host and their replies, and noticing that it died.

The host (``vllm_host.serve``) answers ``(request id, op, payload)`` in the order it receives
them with ``(request id, status, result)``. The client may have several requests in flight (a
generation submitted ahead, then a weight update); a reply read while waiting for another request
is kept until its own waiter asks. The connection is any ``multiprocessing.connection.Connection``:
the Pipe to a spawned host, or a socket to an engine server.

A host that dies (EOF on the connection, a broken pipe) or a wait interrupted by Ctrl-C ends the
engine: ``on_fatal`` runs (the engine's shutdown) and the error names the engine and the
operation, e.g. ``vLLM engine process died during generate (exit code -9): engine 1 of 2 ...``.
A reply with status "refused" (an engine server that cannot serve the request for a reason the
user fixes, e.g. a model path it cannot read) raises ``EngineRefusedError`` with the host's message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from maye_pl.errors import UserError


class VLLMEngineError(RuntimeError):
    """The engine process failed; the message carries its traceback."""


class EngineRefusedError(UserError, VLLMEngineError):
    """The engine cannot serve for a reason the user fixes (a remote engine server's key, address,
    business or model path); the message names it and the fix."""


class Host(Protocol):
    """The far end of an ``EngineRPC``: a spawned host process (``vllm_host.HostProcess``) or an
    engine server's engine (``remote.RemoteHost``)."""

    conn: Any
    """The trainer's end of the connection."""
    weight_group_addresses: tuple[str, str]
    """(trainer, engine): the addresses the two ends of the collective weight transport bind."""
    log_location: str
    """Where the engine's log is (``"its log above"``), for error messages."""

    @property
    def pid(self) -> int | None:
        """The host's process id on this machine (None when it runs elsewhere)."""
        ...

    def exit_code(self, wait_s: float) -> int | None:
        """The host's exit code, waiting up to ``wait_s`` for it to end (None: unknown or running)."""
        ...

    def lost(self, op: str, wait_s: float) -> str:
        """What happened to a host found gone during ``op`` (waiting up to ``wait_s`` to learn it)."""
        ...

    def stop(self, grace_s: float = 5.0) -> None:
        """End the host (or this client's use of it) and close the connection."""
        ...


class EngineRPC:
    """The client side of one host's request/reply protocol.

    Args:
        host: the host at the other end.
        name: how errors name the engine (``"engine 0 of 1 on cpu"``).
        on_fatal: called once the engine is unusable (it died, or a wait was interrupted), before
            the error is raised: the engine's shutdown.
        first_request_id: the next request's id (ids before it are reserved, e.g. the start request).
    """

    def __init__(self, host: Host, name: str, on_fatal: Callable[[], None], first_request_id: int = 1) -> None:
        self.host = host
        self.name = name
        self.on_fatal = on_fatal
        self.closed = False
        self._replies: dict[int, tuple[str, Any]] = {}  # request id -> (status, result), read ahead
        self._next_request_id = first_request_id

    def send(self, op: str, payload: Any = None, request_id: int | None = None) -> int:
        """Send ``(request id, op, payload)``; returns the request id (a fresh one unless given)."""
        if self.closed:
            raise VLLMEngineError(f"VLLMEngine.{op}: the engine was shut down; create a new VLLMEngine.")
        if request_id is None:
            request_id, self._next_request_id = self._next_request_id, self._next_request_id + 1
        try:
            self.host.conn.send((request_id, op, payload))
        except (BrokenPipeError, ConnectionResetError) as error:
            raise self.died(op) from error
        return request_id

    def send_handle(self, fd: int, op: str) -> None:
        """Pass the file descriptor ``fd`` right behind the request ``op`` just sent (SCM_RIGHTS: a
        host on this machine only); the host receives it as its own descriptor."""
        from multiprocessing.reduction import send_handle

        try:
            send_handle(self.host.conn, fd, self.host.pid)
        except OSError as error:
            raise self.died(op) from error

    def call(self, op: str, payload: Any = None) -> Any:
        """Send one operation and wait for its reply (operations ahead of it finish first)."""
        return self.wait(self.send(op, payload), op)

    def arrived(self, request_id: int, timeout_s: float = 0.0) -> bool:
        """True when the reply to ``request_id`` is here, waiting up to ``timeout_s`` for the next
        message (reads, without waiting further, whatever has arrived; a dead host counts as
        arrived: ``wait`` reports it)."""
        try:
            while request_id not in self._replies and self.host.conn.poll(timeout_s):
                self._read_reply()
        except (EOFError, ConnectionResetError, OSError):
            return True
        return request_id in self._replies

    def wait(self, request_id: int, op: str) -> Any:
        """The result of request ``request_id``; raises the engine's error if it failed."""
        while request_id not in self._replies:
            if self.closed:
                raise VLLMEngineError(f"VLLMEngine.{op}: the engine was shut down while it ran.")
            try:
                self._read_reply()
            except (EOFError, OSError) as error:  # closed, reset, or a vanished peer's keep-alive timeout
                raise self.died(op) from error
            except BaseException:
                # Interrupted while waiting (Ctrl-C): the engine would go on with work nobody
                # waits for, and its reply would be read by the next call; this engine is done.
                self.on_fatal()
                raise
        status, result = self._replies.pop(request_id)
        if status == "refused":
            self.on_fatal()
            raise EngineRefusedError(result)
        if status == "error":
            raise VLLMEngineError(f"vLLM engine failed in {op} ({self.name}):\n{result}")
        return result

    def died(self, op: str) -> VLLMEngineError:
        """The error for a host found dead during ``op`` (after the engine's shutdown)."""
        what = self.host.lost(op, wait_s=5)
        self.on_fatal()
        return VLLMEngineError(f"{what}: {self.name}; see {self.host.log_location}.")

    def close(self) -> None:
        """No more requests; replies still unread are dropped."""
        self.closed = True
        self._replies.clear()

    def _read_reply(self) -> None:
        request_id, status, result = self.host.conn.recv()
        self._replies[request_id] = (status, result)

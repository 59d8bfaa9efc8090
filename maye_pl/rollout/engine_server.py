"""`python -m maye_pl engine --listen HOST:PORT`: a vLLM engine for a trainer on another machine.

    export MAYE_PL_ENGINE_KEY=...        # the same key on the trainer's nodes
    python -m maye_pl engine --listen 0.0.0.0:8100 [--device cuda:0]
    python -m maye_pl fit --config configs/geo3k.yaml --rollout.remote_engines '["infer-1:8100"]'

Topology (one client at a time; the engine host is ``vllm_host``'s, as a local engine's)::

    engine server (this process)                    engine host (spawned; imports vLLM while idle)
      accept; handshake (remote.py): the key          takes the client's socket and the engine's
      "busy" while a client is served                 arguments, starts vllm.LLM and serves the
      the start request: model path checked           client (vllm_host.serve) until it leaves
      socket + arguments handed to the host  ──────►
      watches the socket for a hang-up; then stops the host and starts the next one

The trainer sends the engine's arguments (model path, dtype, lengths, ...) when it connects, so one
server serves any run; the server decides the device (``--device``) and the engine's environment.
The model path is read on the server's machine: the trainer sends local paths absolute, so the
checkpoint must sit at the same path there (a shared filesystem, or a copy).

Lifetime: the server outlives its clients. A trainer that ends, crashes or is SIGKILLed closes
its connection (a machine that vanishes is noticed by TCP keep-alive within ~2 minutes); the server
then stops the engine host at once, even mid-generation (nobody waits for that work), and takes
the next trainer once a fresh host has imported vLLM. SIGTERM or Ctrl-C stops the server
and its engine host (nothing is left running); the host would also die with the server if the
server were killed (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import send_handle
from pathlib import Path

import torch

from maye_pl.errors import USER_ERROR_EXIT_CODE, ConfigError, UserError
from maye_pl.rollout.remote import (
    HANDSHAKE_TIMEOUT_S,
    KEY_ENV,
    WrongKeyError,
    authenticate_client,
    engine_key,
    keep_alive,
    missing_key_message,
    parse_address,
    set_receive_timeout,
)
from maye_pl.rollout.vllm_host import START_REQUEST_ID, HostProcess, StartRequest, host_environment, spawn_host

logger = logging.getLogger("maye_pl.engine_server")


@dataclass
class _Client:
    """The trainer being served: its engine host, its address, since when (time.monotonic), and
    the server's copy of its socket, watched for the trainer hanging up (never read)."""

    host: HostProcess
    peer: str
    since: float
    sock: socket.socket

    def ended(self, fd: int) -> bool:
        """Whether a poll event on ``fd`` means this client is done (its host exited, or it hung up)."""
        return fd in (self.host.process.sentinel, self.sock.fileno())


class EngineServer:
    """Serves one vLLM engine to one authenticated trainer at a time.

    Args:
        listen: ``HOST:PORT`` to listen on (port 0: a free one; ``address`` says which).
        key: the shared key (``MAYE_PL_ENGINE_KEY``).
        device: the engine's device (``"cpu"``, ``"cuda:N"``).
    """

    def __init__(self, listen: str, key: bytes, device: str) -> None:
        try:
            host, port = parse_address(listen)
        except ValueError as error:
            raise ConfigError(f"--listen: {error}.") from error
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.listener = socket.create_server((host, port), family=family)
        except OSError as error:
            raise ConfigError(f"--listen {listen}: cannot listen there ({error.strerror or error}); "
                              "pick a free port, or an address of this machine (0.0.0.0: all).") from error
        bound_host, bound_port = self.listener.getsockname()[:2]
        self.address = f"[{bound_host}]:{bound_port}" if family == socket.AF_INET6 else f"{bound_host}:{bound_port}"
        self.key = key
        self.device = device
        self.warm: HostProcess | None = None
        """The next client's engine host (importing vLLM, or waiting)."""
        self.client: _Client | None = None
        self._poller = select.poll()

    def serve_forever(self) -> None:
        """Take trainers one at a time; returns only by an exception (KeyboardInterrupt on SIGTERM)."""
        self._warm_up()
        self._poller.register(self.listener, select.POLLIN)
        print(f"listening on {self.address}", flush=True)
        while True:
            for fd, _ in self._poller.poll():
                if self.client is not None and self.client.ended(fd):
                    self._client_left()
                elif fd == self.listener.fileno():
                    self._accept()

    def close(self) -> None:
        """Stop the engine hosts (the client's connection closes with its host) and stop listening."""
        for host in (self.warm, self.client.host if self.client else None):
            if host is not None:
                host.stop(grace_s=0.0)  # holds nothing that needs a graceful end
        if self.client is not None:
            self.client.sock.close()
        self.warm = self.client = None
        self.listener.close()

    # ------------------------------------------------------------------ one connection

    def _accept(self) -> None:
        """Take a new connection: refuse it (wrong key, busy, unreadable model) or hand it over."""
        sock, peer_address = self.listener.accept()
        peer = f"{peer_address[0]}:{peer_address[1]}"
        keep_alive(sock)
        interface = sock.getsockname()[0]  # where this client reaches us: the engine's weight-group address
        conn = Connection(sock.detach())
        try:
            start = self._admit(conn, peer, interface)
            if start is not None:
                self._start(conn, peer, *start)
        except OSError as error:  # the client left mid-way, or the warm engine host had died
            logger.warning("dropped %s: %s", peer, error)
        finally:
            conn.close()  # a handed-over engine host holds its own descriptor

    def _admit(self, conn: Connection, peer: str, interface: str) -> tuple[int, StartRequest] | None:
        """The handshake, then the client's start request ``(request id, request)``; None when the
        client was refused or dropped (logged)."""
        try:
            set_receive_timeout(conn, HANDSHAKE_TIMEOUT_S)
            authenticate_client(conn, self.key)
            if self.client is not None:
                conn.send(("busy", self._busy_message()))
                logger.info("refused %s: busy with %s", peer, self.client.peer)
                return None
            conn.send(("ready", {"device": self.device, "address": interface, "pid": os.getpid()}))
            # The client proved the key: from here on its pickles are trusted.
            request_id, op, payload = conn.recv()
            set_receive_timeout(conn, 0)
        except WrongKeyError:
            logger.warning("refused %s: wrong key (its %s differs)", peer, KEY_ENV)
            return None
        except (OSError, EOFError, ValueError, TypeError) as error:  # silent, gone, or a malformed request
            logger.warning("dropped %s: %s", peer, error or type(error).__name__)
            return None
        if op == "shutdown":  # it only looked whether the server is up
            logger.info("%s left before asking for an engine", peer)
            return None
        if op != "start" or not isinstance(payload, StartRequest) or "model" not in payload.engine_args:
            logger.warning("dropped %s: its first request was not a start request (%r)", peer, op)
            return None
        return request_id, payload

    def _start(self, conn: Connection, peer: str, request_id: int, request: StartRequest) -> None:
        """Hand the client to the warm engine host, which starts the engine and answers the start
        request; an unreadable model path is refused here, before any engine starts."""
        model = request.engine_args["model"]
        problem = unreadable_model(model)
        if problem is not None:
            conn.send((request_id, "refused", (
                f"the engine server at {self.address} ({socket.gethostname()}) cannot read the model "
                f"{model!r} (`model.model_path`; the server reads it on its own machine): {problem}. Put the "
                "checkpoint at that path on the inference machine, or on a filesystem both machines mount."
            )))
            logger.warning("refused %s: cannot read the model %s (%s)", peer, model, problem)
            return
        host, self.warm = self.warm, None
        if not host.is_alive():  # it died while idle (killed?): the client waits for a fresh one
            host.stop(grace_s=0.0)
            host = self._spawn_host()
        try:
            host.conn.send((request_id, "serve_client", request.with_env(self._host_environment(request.log_level))))
            send_handle(host.conn, conn.fileno(), host.pid)  # right behind the message that receives it
        except OSError:
            host.stop(grace_s=0.0)
            self._warm_up()
            raise
        # A trainer that hangs up (ends, crashes, is SIGKILLed) frees the server at once, even while
        # its engine still loads or generates: the server watches a copy of its socket.
        watched = socket.socket(fileno=os.dup(conn.fileno()))
        self.client = _Client(host, peer, time.monotonic(), watched)
        self._poller.register(host.process.sentinel, select.POLLIN)
        self._poller.register(watched, select.POLLRDHUP)  # not POLLIN: the host reads the requests
        logger.info("serving %s: %s (%s) on %s, engine host pid %d", peer, model, request.engine_args["dtype"],
                    self.device, host.pid)

    def _client_left(self) -> None:
        """The client hung up or its engine host ended (the engine died): stop the host, take the next."""
        client, self.client = self.client, None
        for watched in (client.host.process.sentinel, client.sock):
            self._poller.unregister(watched)
        code = client.host.exit_code(wait_s=0)
        client.host.stop(grace_s=0.0)  # kills it if it still works for the trainer that left
        client.sock.close()
        why = "closed the connection" if code is None else f"its engine host ended with exit code {code}"
        logger.info("%s left after %.1f min (%s); ready for the next trainer", client.peer,
                    (time.monotonic() - client.since) / 60, why)
        self._warm_up()

    def _warm_up(self) -> None:
        """Start the next client's engine host now, so that vLLM's import is done when it connects."""
        self.warm = self._spawn_host()

    def _spawn_host(self) -> HostProcess:
        return spawn_host(self._host_environment(), self.device)

    def _host_environment(self, log_level: str = "warning") -> dict[str, str]:
        env = host_environment(self.device, log_level)
        env.pop(KEY_ENV, None)  # the engine has no use for the key
        return env

    def _busy_message(self) -> str:
        seconds = time.monotonic() - self.client.since
        since = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
        return (f"the engine server at {self.address} is busy: it serves the trainer at {self.client.peer} "
                f"(connected {since} ago) and takes one trainer at a time. Wait for that run to end, "
                "or start another server (python -m maye_pl engine --listen HOST:PORT) and list it in "
                "`rollout.remote_engines`.")


def unreadable_model(model: str) -> str | None:
    """Why this machine cannot read the checkpoint directory ``model`` (None: it can, or ``model``
    is a Hugging Face hub id, which vLLM resolves: trainers send local paths absolute)."""
    path = Path(model)
    if not path.is_absolute():
        return None
    if not path.exists():
        return "no such file or directory"
    if not path.is_dir():
        return "not a directory (a Hugging Face checkpoint directory is expected)"
    if not (path / "config.json").is_file():
        return "it holds no config.json (not a Hugging Face checkpoint directory)"
    if not (os.access(path, os.R_OK | os.X_OK) and os.access(path / "config.json", os.R_OK)):
        return f"this server's user ({os.getuid()}) may not read it"
    return None


def resolve_device(requested: str) -> str:
    """``--device``: ``"auto"`` (the first GPU, or the CPU without one), ``"cpu"`` or ``"cuda:N"``."""
    gpus = torch.cuda.device_count()
    if requested == "auto":
        return "cuda:0" if gpus else "cpu"
    index = requested.removeprefix("cuda:")
    if requested == "cpu" or (index.isdigit() and int(index) < gpus):
        return requested
    raise ConfigError(f"--device {requested!r} must be 'auto', 'cpu' or one of this machine's {gpus} GPU(s) "
                      f"({', '.join(f'cuda:{i}' for i in range(gpus)) or 'none'}).")


def main(argv: list[str]) -> None:
    """``python -m maye_pl engine``: serve until SIGTERM or Ctrl-C; a user error exits with status 2."""
    parser = argparse.ArgumentParser(
        prog="python -m maye_pl engine",
        description=f"Serve a vLLM engine to one trainer at a time (`rollout.remote_engines`); the shared "
                    f"key is read from {KEY_ENV}.",
    )
    parser.add_argument("--listen", required=True, metavar="HOST:PORT",
                        help="address to listen on (0.0.0.0:8100: every interface, port 8100; port 0: any free one)")
    parser.add_argument("--device", default="auto", help="the engine's device: auto (cuda:0, or the CPU), cpu, cuda:N")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine server: %(message)s", stream=sys.stdout)
    try:
        key = engine_key()
        if key is None:
            raise ConfigError(missing_key_message("python -m maye_pl engine"))
        server = EngineServer(args.listen, key, resolve_device(args.device))
    except UserError as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops like Ctrl-C
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the clean-up short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        logger.info("stopping")
    finally:
        server.close()
    logger.info("stopped")

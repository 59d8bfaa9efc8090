"""Remote engines: the trainer's end of a connection to ``python -m maye_pl engine --listen``.

A trainer with ``rollout.remote_engines`` connects each engine group's owner to one engine server
(``engine_server.py``) instead of spawning a local engine host; from then on the connection is a
``Host`` like a spawned host's pipe: ``EngineRPC`` sends the same requests, the server's engine
host answers them. Weights travel over the collective transport (a process group whose store the
trainer opens on the address it reaches the server from) or through the socket itself (``pipe``).

Authentication: both ends hold the key in ``MAYE_PL_ENGINE_KEY`` and prove it to each other before
either unpickles a byte the other sent. The handshake exchanges raw, length-bounded byte strings
only (``Connection.send_bytes`` / ``recv_bytes(256)``)::

    server -> client   PROTOCOL + server nonce (32 random bytes)
    client -> server   client nonce + HMAC-SHA256(key, "client" + server nonce + client nonce)
    server -> client   HMAC-SHA256(key, "server" + client nonce + server nonce)   or REFUSED

and every message after it is a pickle. Python's own ``multiprocessing.connection`` handshake
(``Listener``/``Client`` with ``authkey``) is also free of unpickling (CPython 3.11's
``deliver_challenge``/``answer_challenge`` read with ``recv_bytes(256)``), but it blocks without
a timeout on a peer that sends nothing, and 3.12 changed its digest, so a 3.11 trainer could not
authenticate to a 3.12 server; this handshake has a deadline and does not depend on the Python
version. The key authenticates; it does not encrypt (weights and prompts cross the network in the
clear, as with NCCL and gloo): run trainers and servers on a network you trust.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
from multiprocessing.connection import Connection
from typing import Any

from maye_pl.errors import ConfigError
from maye_pl.rollout.rpc import EngineRefusedError

KEY_ENV = "MAYE_PL_ENGINE_KEY"
"""The environment variable both a trainer and an engine server read their shared key from."""
PROTOCOL = b"maye_pl-engine/1 "
"""The first bytes an engine server sends: what it is, and the handshake's version."""
REFUSED = b"refused: wrong key"
"""The server's answer to a client whose proof does not match its key."""
HANDSHAKE_TIMEOUT_S = 10.0
"""Longest wait for each handshake message (a peer that sends nothing is dropped after it)."""
CONNECT_TIMEOUT_S = 30.0
"""Longest wait for a server to accept the connection and answer the handshake."""
_NONCE_BYTES = 32
_MAX_HANDSHAKE_BYTES = 256  # longer handshake messages are refused unread
_SHUTDOWN_REQUEST_ID = -1  # vllm_host.SHUTDOWN_REQUEST_ID (the host serves the same requests)


class WrongKeyError(ConnectionError):
    """The peer does not hold the same key (or does not speak the handshake)."""


# ------------------------------------------------------------------------------------ the key


def engine_key() -> bytes | None:
    """The shared key from ``MAYE_PL_ENGINE_KEY`` (None when unset or empty)."""
    key = os.environ.get(KEY_ENV, "")
    return key.encode() if key else None


def missing_key_message(who: str) -> str:
    """What to do when ``who`` (``"`rollout.remote_engines`"``, the server command) finds no key."""
    return (
        f"{who} needs the shared key in the environment variable {KEY_ENV} (the same value on the "
        f"engine servers and on every trainer node); create one with "
        f"`export {KEY_ENV}=$(python -c 'import secrets; print(secrets.token_hex(16))')`."
    )


# ------------------------------------------------------------------------------ the handshake


def _proof(key: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    # The role label keeps a proof of one direction from being replayed as the other.
    return hmac.new(key, role + first + second, hashlib.sha256).digest()


def authenticate_client(conn: Connection, key: bytes) -> None:
    """The server's half: challenge the client, check its proof, prove the key back.

    Reads only ``recv_bytes(256)`` (raw bytes); raises ``WrongKeyError`` (after telling the
    client) on a wrong proof, OSError/EOFError on a broken or silent connection.
    """
    server_nonce = os.urandom(_NONCE_BYTES)
    conn.send_bytes(PROTOCOL + server_nonce)
    answer = conn.recv_bytes(_MAX_HANDSHAKE_BYTES)
    client_nonce, proof = answer[:_NONCE_BYTES], answer[_NONCE_BYTES:]
    expected = _proof(key, b"client", server_nonce, client_nonce)
    if len(client_nonce) != _NONCE_BYTES or not hmac.compare_digest(proof, expected):
        conn.send_bytes(REFUSED)
        raise WrongKeyError("the client's proof does not match this server's key")
    conn.send_bytes(_proof(key, b"server", client_nonce, server_nonce))


def authenticate_server(conn: Connection, key: bytes) -> None:
    """The client's half: answer the server's challenge, then check that the server holds the key
    too. Raises ``WrongKeyError`` when either proof fails or the peer is no engine server."""
    greeting = conn.recv_bytes(_MAX_HANDSHAKE_BYTES)
    server_nonce = greeting[len(PROTOCOL):]
    if not greeting.startswith(PROTOCOL) or len(server_nonce) != _NONCE_BYTES:
        raise WrongKeyError(f"it is no maye_pl engine server (it greeted with {greeting[:40]!r}); check the address")
    client_nonce = os.urandom(_NONCE_BYTES)
    conn.send_bytes(client_nonce + _proof(key, b"client", server_nonce, client_nonce))
    answer = conn.recv_bytes(_MAX_HANDSHAKE_BYTES)
    if answer == REFUSED:
        raise WrongKeyError(f"it was started with another key than this {KEY_ENV}; set {KEY_ENV} to the "
                            "server's key on every trainer node")
    if not hmac.compare_digest(answer, _proof(key, b"server", client_nonce, server_nonce)):
        raise WrongKeyError(f"it could not prove that it holds the key in {KEY_ENV}; is another program "
                            "listening at that address?")


def set_receive_timeout(conn: Connection, seconds: float) -> None:
    """Make a blocking read on ``conn``'s socket fail (BlockingIOError) after ``seconds`` (0: never).

    ``SO_RCVTIMEO`` keeps the socket blocking, which ``Connection``'s plain ``os.read`` needs."""
    whole = int(seconds)
    with _socket_of(conn) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", whole, int((seconds - whole) * 1e6)))


def keep_alive(sock: socket.socket) -> None:
    """Have the kernel probe an idle connection so a peer machine that vanished (no FIN, no RST)
    fails the next read after about 2 minutes instead of never."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
        if hasattr(socket, option):  # Linux; elsewhere the system's defaults apply
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class _socket_of:
    """``with _socket_of(conn) as sock``: ``conn``'s socket as a ``socket.socket`` (not closed after)."""

    def __init__(self, conn: Connection) -> None:
        self.sock = socket.socket(fileno=conn.fileno())

    def __enter__(self) -> socket.socket:
        return self.sock

    def __exit__(self, *exc_info: object) -> None:
        self.sock.detach()


# -------------------------------------------------------------------------------- the client


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:8100"`` for IPv6) -> ``(host, port)``; ValueError otherwise."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT (e.g. 10.0.0.5:8100, [::1]:8100)")
    return host, int(port)


class RemoteHost:
    """An engine server's engine, seen from the trainer: the ``Host`` an ``EngineRPC`` talks to.

    Args:
        conn: the authenticated connection (the server has handed it to its engine host).
        address: the server's ``HOST:PORT`` as configured.
        info: the server's greeting: ``device`` (its engine's), ``address`` (its end of this
            connection), ``pid`` (the server process).
    """

    def __init__(self, conn: Connection, address: str, info: dict[str, Any]) -> None:
        self.conn = conn
        self.address = address
        self.device: str = info["device"]
        self.server_pid: int = info["pid"]
        with _socket_of(conn) as sock:
            local = sock.getsockname()[0]
        self.weight_group_addresses = (local, info["address"])
        """(trainer, engine): the interfaces each end of this connection uses, which the weight
        group's members bind (the trainer's store listens on its own)."""
        self.log_location = f"the log of the engine server at {address} (pid {self.server_pid} there)"

    pid = None  # the engine host runs on another machine

    def exit_code(self, wait_s: float) -> int | None:
        return None  # unknown from here: the server's log has it

    def lost(self, op: str, wait_s: float) -> str:
        return (f"the connection to the engine server at {self.address} closed during {op} (the server "
                "stopped, its engine died, or the network dropped)")

    def stop(self, grace_s: float = 5.0) -> None:
        """End this trainer's use of the server: its engine host exits, the server takes the next client."""
        try:
            self.conn.send((_SHUTDOWN_REQUEST_ID, "shutdown", None))
        except OSError:
            pass  # already gone
        self.conn.close()


def connect_engine_server(address: str, name: str, timeout_s: float = CONNECT_TIMEOUT_S) -> RemoteHost:
    """Connect to the engine server at ``address`` and authenticate both ways.

    ``name`` says which engine this is in messages (``"engine 0 of 1 (node 0, rank 0)"``). Every
    problem the user fixes (no key, wrong key, unreachable, busy) is an ``EngineRefusedError``
    naming the address and the fix.
    """
    key = engine_key()
    if key is None:
        raise EngineRefusedError(missing_key_message("`rollout.remote_engines`"))
    host, port = parse_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as error:
        raise EngineRefusedError(
            f"cannot reach the engine server at {address} ({name}, `rollout.remote_engines`): "
            f"{error.strerror or error}. Start it on that machine with `python -m maye_pl engine --listen "
            f"{address}` (and {KEY_ENV} set), or fix the address."
        ) from error
    sock.settimeout(None)  # blocking again: Connection reads with plain os.read
    keep_alive(sock)
    conn = Connection(sock.detach())
    try:
        set_receive_timeout(conn, timeout_s)
        authenticate_server(conn, key)
        status, info = conn.recv()  # the peer proved the key: its pickles are trusted
        set_receive_timeout(conn, 0)
    except WrongKeyError as error:
        conn.close()
        raise EngineRefusedError(f"the engine server at {address} did not accept {name}: {error}.") from error
    except (OSError, EOFError) as error:
        conn.close()
        raise EngineRefusedError(
            f"the engine server at {address} did not complete the handshake within {timeout_s:.0f} s ({name}): "
            f"{error or type(error).__name__}. Is `python -m maye_pl engine` listening there?"
        ) from error
    if status != "ready":  # "busy": the server's message says whom it serves
        conn.close()
        raise EngineRefusedError(f"{name}: {info}")
    return RemoteHost(conn, address, info)


# ---------------------------------------------------------------------------------- the config


def remote_problems(remote_engines: list[str] | None, engine: str, weight_transport: str,
                    tensor_parallel_size: int) -> list[str]:
    """Every problem with ``rollout.remote_engines`` and the settings it constrains."""
    if not remote_engines:
        return []
    problems = []
    for index, address in enumerate(remote_engines):
        try:
            parse_address(address)
        except ValueError as error:
            problems.append(f"`rollout.remote_engines`[{index}]: {error}.")
    if len(set(remote_engines)) != len(remote_engines):
        problems.append(f"`rollout.remote_engines`={remote_engines} lists a server twice; a server serves one "
                        "engine group: list each once.")
    if engine != "vllm":
        problems.append(f"`rollout.remote_engines` serves vLLM engines; `rollout.engine`={engine!r} must be 'vllm'.")
    problems += remote_engine_problems(weight_transport, tensor_parallel_size)
    if engine_key() is None:
        problems.append(missing_key_message("`rollout.remote_engines`"))
    return problems


def remote_engine_problems(weight_transport: str, tensor_parallel_size: int) -> list[str]:
    """What keeps an engine server from serving with these settings: a ``rollout.weight_transport``
    that cannot reach another machine, tensor parallelism (a server's engine runs on one device)."""
    problems = []
    if weight_transport == "shared_memory":
        problems.append(
            "`rollout.weight_transport`='shared_memory' needs the engine on this host's CPU; a remote engine "
            "takes 'collective' (a process group over the network) or 'pipe' (the engine's socket)."
        )
    if tensor_parallel_size != 1:
        problems.append(
            f"`rollout.tensor_parallel_size`={tensor_parallel_size}: an engine server runs its engine on one "
            "device; set it to 1 and run one server per GPU (`--device cuda:N`, one port each) in "
            "`rollout.remote_engines`."
        )
    return problems


def check_remote_count(remote_engines: list[str], num_engines: int, num_nodes: int) -> None:
    """A ConfigError unless ``rollout.remote_engines`` lists one server per engine group: the list is
    in engine-group order, node-major (node n's K = ``num_engines`` groups take entries n*K .. n*K+K-1)."""
    if len(remote_engines) != num_engines * num_nodes:
        raise ConfigError(
            f"`rollout.remote_engines` lists {len(remote_engines)} server(s); `rollout.num_engines`={num_engines} "
            f"engine(s) per node on `trainer.num_nodes`={num_nodes} node(s) take {num_engines * num_nodes} (node n's "
            f"engines are entries n*K .. n*K+K-1): list that many, or set `rollout.num_engines` to "
            f"len(remote_engines) / num_nodes."
        )

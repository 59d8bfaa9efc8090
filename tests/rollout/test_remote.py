"""The remote-engine client without a server: the key handshake over a socket pair (both ends
prove the key, a wrong key fails on both ends, a silent peer times out), addresses, and the
`rollout.remote_engines` config checks. The engine server itself: test_engine_server.py."""

from __future__ import annotations

import socket
import threading
import time
from multiprocessing.connection import Connection

import pytest

from maye_pl.errors import ConfigError
from maye_pl.rollout.callback import RolloutCallback
from maye_pl.rollout.groups import EngineGroups
from maye_pl.rollout.remote import (
    KEY_ENV,
    WrongKeyError,
    authenticate_client,
    authenticate_server,
    check_remote_count,
    parse_address,
    set_receive_timeout,
)


def _handshake(server_key: bytes, client_key: bytes) -> tuple[BaseException | None, BaseException | None]:
    """Run both halves over a socket pair; returns (server's error, client's error)."""
    server_end, client_end = (Connection(s.detach()) for s in socket.socketpair())
    errors: dict[str, BaseException | None] = {"server": None, "client": None}

    def run(side: str, authenticate, conn: Connection, key: bytes) -> None:
        try:
            authenticate(conn, key)
        except BaseException as error:
            errors[side] = error

    threads = [threading.Thread(target=run, args=("server", authenticate_client, server_end, server_key)),
               threading.Thread(target=run, args=("client", authenticate_server, client_end, client_key))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    server_end.close()
    client_end.close()
    return errors["server"], errors["client"]


def test_the_same_key_authenticates_both_ends() -> None:
    assert _handshake(b"k3y", b"k3y") == (None, None)


def test_a_wrong_key_fails_on_both_ends_with_what_to_set() -> None:
    server_error, client_error = _handshake(b"the server's", b"another")
    assert isinstance(server_error, WrongKeyError)
    assert isinstance(client_error, WrongKeyError)
    assert f"started with another key than this {KEY_ENV}; set {KEY_ENV} to the server's key" in str(client_error)


def test_a_silent_peer_times_out() -> None:
    server_end, client_end = (Connection(s.detach()) for s in socket.socketpair())
    set_receive_timeout(server_end, 0.2)
    start = time.monotonic()
    with pytest.raises(BlockingIOError):  # the client never answers the challenge
        authenticate_client(server_end, b"k3y")
    assert time.monotonic() - start < 5
    server_end.close()
    client_end.close()


@pytest.mark.parametrize(("address", "parsed"), [("10.0.0.5:8100", ("10.0.0.5", 8100)),
                                                  ("[::1]:8100", ("::1", 8100)), ("infer-1:0", ("infer-1", 0))])
def test_addresses_parse(address, parsed) -> None:
    assert parse_address(address) == parsed


def test_remote_engine_settings_are_checked_together(monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError) as raised:
        RolloutCallback(engine="hf", weight_transport="shared_memory", tensor_parallel_size=2,
                        remote_engines=["a:1", "b", "a:1"])
    message = str(raised.value)
    assert "`rollout.remote_engines`[1]: 'b' is not HOST:PORT" in message
    assert "lists a server twice" in message
    assert "`rollout.engine`='hf' must be 'vllm'" in message
    assert "'shared_memory' needs the engine on this host's CPU; a remote engine takes 'collective'" in message
    assert "`rollout.tensor_parallel_size`=2: an engine server runs its engine on one device" in message
    assert f"needs the shared key in the environment variable {KEY_ENV}" in message


def test_servers_map_onto_each_nodes_rank_groups() -> None:
    # 4 servers, 2 nodes of 3 ranks, `rollout.num_engines` 2: group g (owner = its first rank)
    # connects to entry g, node-major: node 0's groups take entries 0, 1; node 1's take 2, 3.
    servers = ["a:1", "b:1", "c:1", "d:1"]
    check_remote_count(servers, num_engines=2, num_nodes=2)
    groups = EngineGroups(world_size=6, num_nodes=2, engines_per_node=2)
    assert {servers[g]: groups.groups[g] for g in range(4)} == {"a:1": (0, 1), "b:1": (2,), "c:1": (3, 4), "d:1": (5,)}
    with pytest.raises(ConfigError, match=r"lists 3 server\(s\); `rollout.num_engines`=2 engine\(s\) per node on "
                                          r"`trainer.num_nodes`=2 node\(s\) take 4"):
        check_remote_count(servers[:3], num_engines=2, num_nodes=2)

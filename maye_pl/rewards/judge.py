"""``math_judge``: is a response's last boxed answer equal to the golden answer? Hard time limit.

math-verify bounds its own work with ``signal.alarm``: outside the main thread it cannot
(``parse``/``verify`` raise "signal only works in main thread"), and an alarm never interrupts
one long C-level operation (``10^{10^{10^{10}}}`` as a Python big integer). Rewards are computed
in Lightning hooks, data-loader workers and threads, so the symbolic comparison runs in a
separate worker process (``_judge_worker.py``) that the caller waits on with a deadline and
kills when the deadline passes. Whatever the input, a call answers within ``timeout`` seconds
of judging time, in any thread and any process.

How one pair is judged (the cheap steps run here, in the calling process):
  1. the prediction's last ``\\boxed{}``/``\\fbox{}`` (``extract_boxed``); none -> False;
  2. the golden answer: the solution's last box, or the whole solution when it has none;
  3. answers over ``MAX_ANSWER_CHARS`` characters, or with unbalanced braces, are compared as
     whitespace-free strings only;
  4. MAYE's normalisations (``normalize_answer``), then exact match -> True;
  5. MAYE's boxed-integer fallback (``60^{\\prime}`` vs 60) -> True;
  6. math-verify in the worker: ``verify(parse(golden), parse(predicted))``.

Float tolerance, consistent with MAYE (math-verify OR a sympy scorer with 1e-8 absolute
tolerance): math-verify's default, numbers equal after rounding to 6 decimals. So 0.5 == 1/2
and 0.333333 == 1/3, but a rounded answer is wrong: 12.57 != 4\\pi, 4.2426 != 3\\sqrt{2},
0.33 != 1/3. Symbolic forms are compared exactly (2\\sqrt{3} == \\sqrt{12}, 4\\pi == 4π).

Workers: one per concurrently judging thread (usually one per process), started lazily, reused,
restarted after a timeout or crash, reset after ``fork`` (a forked child starts its own), and
closed at interpreter exit; each also dies with its owner (PDEATHSIG). Starting one takes about
half a second (python + math-verify, no torch); that start is not counted in ``timeout``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from maye_pl.rewards.answers import (
    MAX_ANSWER_CHARS,
    compact,
    extract_boxed,
    golden_answer,
    integer_fallback,
    normalize_answer,
)

log = logging.getLogger(__name__)

_WORKER_SCRIPT = Path(__file__).with_name("_judge_worker.py")
# Starting python + sympy on a loaded machine can take seconds; past this the worker is broken.
_WORKER_START_TIMEOUT_S = 60.0
_CLOSE_GRACE_S = 2.0
# selectors reject timeouts past ~2**31 ms; no real judgement needs more than a day either.
_LONGEST_TIMEOUT_S = 86400.0


def math_judge(prediction: str, solution: str, timeout: float = 5.0) -> bool:
    """Whether the last boxed answer in ``prediction`` equals the golden ``solution``.

    ``prediction`` is a model response; ``solution`` is the golden answer, boxed or plain
    (``"3\\sqrt{2}"``, ``"\\frac{1}{2}"``, ``"60"``). Never raises: a pair that cannot be judged,
    or whose symbolic comparison takes more than ``timeout`` seconds, is False. See the module
    docstring for the steps and the float tolerance.
    """
    try:
        return math_judge_batch([prediction], [solution], timeout)[0]
    except Exception:  # noqa: BLE001 - the contract: a reward never crashes a training step
        log.exception("math_judge failed on one pair; judged False")
        return False


def math_judge_batch(
    predictions: Sequence[str], solutions: Sequence[str], timeout: float = 5.0
) -> list[bool]:
    """``math_judge`` over pairs, sending the pairs that need math-verify to one worker at once.

    Each pair gets its own ``timeout`` (the clock of pair i starts when pair i-1 is answered);
    a pair that runs over is False, the worker is replaced, and the rest go on.

    Raises:
        ValueError: when ``predictions`` and ``solutions`` differ in length.
    """
    return judge_pairs("math_judge_batch", predictions, solutions, _judge_locally, timeout)


def judge_pairs(
    caller: str,
    predictions: Sequence[str],
    solutions: Sequence[str],
    settle: Callable[[str, str], bool | tuple[str, ...]],
    timeout: float,
) -> list[bool]:
    """A judge's verdicts: ``settle`` decides each pair in this process (a bool) or returns the
    request for math-verify (a tuple, see ``_judge_remotely``); the requests go to one worker at
    once. A pair whose ``settle`` raises is False (logged): a reward never crashes a training step.

    Raises:
        ValueError: naming ``caller``, when ``predictions`` and ``solutions`` differ in length.
    """
    if len(predictions) != len(solutions):
        raise ValueError(
            f"{caller}: got {len(predictions)} predictions and {len(solutions)} "
            "solutions; they pair up one to one, so pass lists of equal length."
        )
    results: list[bool] = []
    remote: list[tuple[int, tuple[str, ...]]] = []
    for index, (prediction, solution) in enumerate(zip(predictions, solutions)):
        try:
            verdict = settle(prediction, solution)
        except Exception:  # noqa: BLE001 - the contract above
            log.exception("%s failed on pair %d; judged False", caller, index)
            verdict = False
        results.append(verdict is True)
        if isinstance(verdict, tuple):
            remote.append((index, verdict))
    if remote:
        answers = _judge_remotely([pair for _, pair in remote], timeout)
        for (index, _), answer in zip(remote, answers):
            results[index] = answer
    return results


def shutdown_judge_workers() -> None:
    """Close every judge worker of this process (registered with ``atexit``; safe to call twice).

    The next ``math_judge`` starts a fresh worker.
    """
    _POOL.close_all()


# --- Steps 1-5: in the calling process ------------------------------------------------------


def _judge_locally(prediction: str, solution: str) -> bool | tuple[str, str]:
    """The verdict when cheap steps settle it, else the (golden, predicted) pair for math-verify."""
    if not isinstance(prediction, str) or not isinstance(solution, str):
        return False
    predicted = extract_boxed(prediction)
    if predicted is None:
        return False
    golden = golden_answer(solution)
    if not _parseable(predicted) or not _parseable(golden):
        return bool(compact(golden)) and compact(predicted) == compact(golden)
    predicted, golden = normalize_answer(predicted), normalize_answer(golden)
    if not predicted or not golden:
        return False
    if compact(predicted) == compact(golden) or integer_fallback(predicted, golden):
        return True
    return golden, predicted


def _parseable(answer: str) -> bool:
    """Short enough for sympy, and braces balanced as math-verify counts them (no escapes)."""
    return len(answer) <= MAX_ANSWER_CHARS and _naive_braces_balanced(answer)


def _naive_braces_balanced(text: str) -> bool:
    depth = 0
    for char in text:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


# --- Step 6: the worker ---------------------------------------------------------------------


def _judge_remotely(pairs: list[tuple[str, ...]], timeout: float) -> list[bool]:
    """math-verify's verdict on each pair in the worker (protocol in ``_judge_worker.py``); False past
    ``timeout`` seconds each. ``(golden, predicted)``: extracted answers; ``(first, second, "sentences")``:
    texts parsed as they are, ``verify(parse(first), parse(second))``."""
    if not timeout > 0:  # also NaN: no time to judge, and no worker to kill for it
        return [False] * len(pairs)
    timeout = min(timeout, _LONGEST_TIMEOUT_S)
    results: list[bool] = []
    while len(results) < len(pairs):
        try:
            with _POOL.lease() as worker:
                answers, finished = worker.judge(pairs[len(results) :], timeout)
        except (OSError, TimeoutError, RuntimeError) as error:
            unjudged = len(pairs) - len(results)
            log.error("math judge worker unavailable (%s); %d pairs judged False", error, unjudged)
            return results + [False] * unjudged
        results += answers
        if not finished:  # the pair after the answered ones ran out of time or crashed the worker
            results.append(False)
    return results


class _JudgeWorker:
    """One worker process and its pipes; used by one thread at a time (see ``_WorkerPool``)."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self._stdin = process.stdin.fileno()
        self._stdout = process.stdout.fileno()
        os.set_blocking(self._stdin, False)
        self._buffer = b""
        self._ready = False

    def alive(self) -> bool:
        return self.process.poll() is None

    def judge(self, pairs: Sequence[tuple[str, str]], timeout: float) -> tuple[list[bool], bool]:
        """Answers for a prefix of ``pairs``, and whether that prefix is all of them.

        Requests are written while answers are read (no deadlock on full pipes); when an answer
        does not come within ``timeout`` of the previous one, or the worker dies, the worker is
        killed and the answers so far are returned.
        """
        if not self._ready:
            self._await_ready()
        payload = memoryview(b"".join(json.dumps(pair).encode() + b"\n" for pair in pairs))
        sent = 0
        answers: list[bool] = []
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self._stdout, selectors.EVENT_READ)
            selector.register(self._stdin, selectors.EVENT_WRITE)
            while len(answers) < len(pairs):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                for key, _ in selector.select(remaining):
                    if key.fd == self._stdin:
                        sent += self._write(payload[sent:])
                        if sent == len(payload):
                            selector.unregister(self._stdin)
                    elif not self._read_into_buffer():
                        self.kill()
                        return answers, False
                lines = self._take_lines()
                if lines:
                    answers += [line == b"1" for line in lines]
                    deadline = time.monotonic() + timeout
        if len(answers) < len(pairs):
            self.kill()
            return answers, False
        return answers, True

    def _await_ready(self) -> None:
        deadline = time.monotonic() + _WORKER_START_TIMEOUT_S
        with selectors.DefaultSelector() as selector:
            selector.register(self._stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining) or not self._read_into_buffer():
                    self.kill()
                    raise RuntimeError(
                        f"judge worker {_WORKER_SCRIPT} (pid {self.process.pid}) did not start "
                        f"within {_WORKER_START_TIMEOUT_S:.0f} s; run `{sys.executable} "
                        f"{_WORKER_SCRIPT} {os.getpid()}` to see why (math-verify importable?)"
                    )
        line, self._buffer = self._buffer.split(b"\n", 1)
        if line != b"ready":
            self.kill()
            raise RuntimeError(f"judge worker said {line[:80]!r} instead of b'ready'")
        self._ready = True

    def _write(self, data: memoryview) -> int:
        try:
            return os.write(self._stdin, data[: 1 << 16])
        except BlockingIOError:
            return 0
        except BrokenPipeError:  # died; the read side sees EOF and reports it
            return 0

    def _read_into_buffer(self) -> bool:
        chunk = os.read(self._stdout, 1 << 16)
        self._buffer += chunk
        return bool(chunk)

    def _take_lines(self) -> list[bytes]:
        *lines, self._buffer = self._buffer.split(b"\n")
        return lines

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait()
        self._close_pipes()

    def close(self) -> None:
        """Ask the worker to exit (stdin EOF); kill it if it does not within a grace period."""
        self._close_pipes()
        try:
            self.process.wait(_CLOSE_GRACE_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def _close_pipes(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                pipe.close()


class _WorkerPool:
    """Idle workers of this process, handed to one thread at a time.

    A thread that finds no idle worker starts one, so threads judging at the same time do not
    wait for each other (each call keeps its own time limit). Workers are started from one
    long-lived thread because PDEATHSIG fires when the *thread* that started the worker exits.
    A forked child forgets its parent's workers (``os.register_at_fork``) and starts its own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_JudgeWorker] = []
        self._leased: set[_JudgeWorker] = set()
        self._spawner: ThreadPoolExecutor | None = None

    @contextlib.contextmanager
    def lease(self) -> Iterator[_JudgeWorker]:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
            if self._spawner is None:
                self._spawner = ThreadPoolExecutor(1, thread_name_prefix="maye-judge-spawner")
            spawner = self._spawner
        if worker is None or not worker.alive():
            worker = _start_worker(spawner)
        with self._lock:
            self._leased.add(worker)
        try:
            yield worker
        finally:
            replacement = None
            if not worker.alive():
                # Start the replacement of a killed worker now: it boots while the caller works.
                with contextlib.suppress(OSError, RuntimeError):
                    replacement = _start_worker(spawner)
            with self._lock:
                self._leased.discard(worker)
                self._idle += [w for w in (worker, replacement) if w is not None and w.alive()]

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's workers, lock and spawner thread are the parent's."""
        self._lock = threading.Lock()
        self._idle, self._leased, self._spawner = [], set(), None

    def close_all(self) -> None:
        with self._lock:
            workers = [*self._idle, *self._leased]
            self._idle, self._leased = [], set()
        for worker in workers:
            worker.close()

    def pids(self) -> list[int]:
        """Process ids of this process's workers (idle and leased), for diagnostics and tests."""
        with self._lock:
            return [worker.process.pid for worker in [*self._idle, *self._leased]]


def _start_worker(spawner: ThreadPoolExecutor) -> _JudgeWorker:
    """A new worker, started from the spawner thread (see ``_WorkerPool``); it boots meanwhile."""
    command = [sys.executable, str(_WORKER_SCRIPT), str(os.getpid())]
    process = spawner.submit(
        subprocess.Popen, command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    ).result()
    return _JudgeWorker(process)


_POOL = _WorkerPool()
atexit.register(shutdown_judge_workers)
os.register_at_fork(after_in_child=_POOL.forget_after_fork)

"""math_judge: a table of geometry answers (equivalent forms True, wrong or unboxed False), a hard
time limit on pathological inputs, the same verdicts from a thread, a forked child and a fresh
interpreter, worker restart after a timeout, and no worker left behind after shutdown or when
the owning process is SIGKILLed."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from maye_pl.rewards import judge
from maye_pl.rewards.judge import math_judge, math_judge_batch, shutdown_judge_workers

# Generous on a shared 2-core machine: IPC and scheduling on top of the judging deadline.
SLACK_S = 3.0
SHORT_TIMEOUT_S = 1.0
BIG_POWER = "\\boxed{10^{10^{10^{10}}}}"  # sympy never finishes this; only the deadline ends it

# (prediction, solution, expected): equivalent forms, wrong values, missing boxes.
JUDGE_TABLE = [
    # integers
    ("The answer is \\boxed{5}.", "5", True),
    ("so \\boxed{12}", "\\boxed{12}", True),  # boxed golden solution
    ("\\boxed{-3}", "-3", True),
    ("\\boxed{7}", "8", False),
    ("\\boxed{-2}", "2", False),
    # decimals (math-verify: equal after rounding to 6 decimals)
    ("\\boxed{2.5}", "2.5", True),
    ("\\boxed{2.50}", "2.5", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{1.5}", "\\frac{3}{2}", True),
    ("\\boxed{0.333333}", "\\frac{1}{3}", True),
    ("\\boxed{0.33}", "\\frac{1}{3}", False),  # rounded: wrong
    ("\\boxed{21.6}", "21.6", True),
    ("\\boxed{21.5}", "21.6", False),
    # fractions
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", True),
    ("\\boxed{\\tfrac{3}{4}}", "0.75", True),
    ("\\boxed{1/2}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{4}{3}}", "4/3", True),
    ("\\boxed{\\frac12}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
    # radicals
    ("\\boxed{2\\sqrt{3}}", "2\\sqrt{3}", True),
    ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", True),
    ("\\boxed{3\\sqrt{2}}", "\\sqrt{18}", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{1}{2}\\sqrt{3}", True),
    ("\\boxed{7 \\sqrt 2}", "7\\sqrt{2}", True),
    ("\\boxed{4.2426}", "3\\sqrt{2}", False),  # rounded: wrong
    ("\\boxed{2\\sqrt{2}}", "2\\sqrt{3}", False),
    # pi forms
    ("\\boxed{4\\pi}", "4\\pi", True),
    ("\\boxed{4π}", "4\\pi", True),
    ("\\boxed{\\frac{4}{3}\\pi}", "\\frac{4\\pi}{3}", True),
    ("\\boxed{16\\pi \\text{ cm}^2}", "16\\pi", True),
    ("\\boxed{12.57}", "4\\pi", False),  # rounded: wrong (policy, as MAYE)
    ("\\boxed{2\\pi}", "4\\pi", False),
    # degrees
    ("\\boxed{60^\\circ}", "60", True),
    ("\\boxed{60^{\\circ}}", "60", True),
    ("\\boxed{60°}", "60", True),
    ("\\boxed{60 degrees}", "60", True),
    ("\\boxed{60}", "60^\\circ", True),
    ("\\boxed{120^{\\circ}}", "120°", True),
    ("\\boxed{60^{\\prime}}", "60", True),  # MAYE's boxed-integer fallback
    ("\\boxed{45^\\circ}", "60", False),
    # units
    ("\\boxed{5\\text{ cm}}", "5", True),
    ("\\boxed{5 \\,\\text{cm}}", "5", True),
    ("\\boxed{24 \\text{cm}^2}", "24", True),
    ("\\boxed{24 cm^2}", "24", True),
    ("\\boxed{8 \\mathrm{m}}", "8", True),
    ("\\boxed{10 units}", "10", True),
    ("\\boxed{5厘米}", "5", True),
    ("\\boxed{5\\text{ cm}}", "6", False),
    # "x =" prefixes and equations
    ("\\boxed{x = 5}", "5", True),
    ("\\boxed{x=5}", "5", True),
    ("\\boxed{AB = 6}", "6", True),
    ("\\boxed{m\\angle ABC = 35^\\circ}", "35", True),
    ("\\boxed{x = 4}", "5", False),
    ("\\boxed{5 = 6}", "5", False),
    # multiple boxes: the last one is the answer
    ("try \\boxed{3}, no: \\boxed{5}", "5", True),
    ("try \\boxed{5}, no: \\boxed{3}", "5", False),
    ("\\fbox{5}", "5", True),
    # no (usable) box
    ("The answer is 5.", "5", False),
    ("", "5", False),
    ("cut off at \\boxed{5", "5", False),
    # hedges and empties are wrong
    ("\\boxed{5, 6}", "5", False),
    ("\\boxed{5 \\text{ or } 6}", "5", False),
    ("\\boxed{}", "5", False),
    ("\\boxed{5}", "", False),
    # other forms
    ("\\boxed{\\left(2, 3\\right)}", "(2,3)", True),
    ("$\\boxed{\\frac{1}{2}}$", "\\boxed{\\frac{1}{2}}", True),
    ("<think>so 2\\sqrt{3}</think> \\boxed{2\\sqrt{3} \\approx 3.46}", "2\\sqrt{3}", True),
    ("\\boxed{2\\sqrt{3} \\approx 3.46}", "3.46", False),  # the stated exact value is the answer
]


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids: list[int], within_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + within_s
    while (alive := [pid for pid in pids if _running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def _warm() -> None:
    """Have a ready worker, so that a timing below measures judging, not the worker's start."""
    assert math_judge("\\boxed{\\sqrt{4}}", "2")


def test_judge_table_has_at_least_60_cases():
    assert len(JUDGE_TABLE) >= 60


@pytest.mark.parametrize(("prediction", "solution", "expected"), JUDGE_TABLE)
def test_math_judge_table(prediction, solution, expected):
    assert math_judge(prediction, solution) is expected


def test_math_judge_batch_matches_single_calls():
    predictions, solutions, expected = zip(*JUDGE_TABLE)
    assert math_judge_batch(list(predictions), list(solutions)) == list(expected)


@pytest.mark.parametrize(
    ("name", "prediction", "solution"),
    [
        ("1 MB of text, right answer at the end", "x " * (1 << 19) + "\\boxed{5}", "5"),
        ("1 MB of {", "{" * (1 << 20), "5"),
        ("1 MB inside a box", "\\boxed{" + "1+" * (1 << 19) + "1}", "5"),
        ("10k nested braces", "\\boxed{" + "{" * 10_000 + "5" + "}" * 10_001, "5"),
        ("10k nested boxes", "\\boxed{" * 10_000 + "5" + "}" * 10_000, "5"),
        ("300 nested braces (sent to math-verify)", "\\boxed{" + "{" * 300 + "5" + "}" * 301, "5"),
        ("10^{10^{10^{10}}}", BIG_POWER, "5"),
        ("10^{10^{10^{10}}} as the golden", "\\boxed{5}", "10^{10^{10^{10}}}"),
    ],
)
def test_math_judge_pathological_inputs_honour_the_time_limit(name, prediction, solution):
    _warm()
    start = time.perf_counter()
    verdict = math_judge(prediction, solution, timeout=SHORT_TIMEOUT_S)
    elapsed = time.perf_counter() - start
    print(f"{name}: {verdict} in {elapsed:.2f} s")
    assert isinstance(verdict, bool)
    assert elapsed <= SHORT_TIMEOUT_S + SLACK_S


def test_math_judge_never_raises_on_non_strings():
    assert math_judge(None, "5") is False  # type: ignore[arg-type]
    assert math_judge("\\boxed{5}", 5) is False  # type: ignore[arg-type]
    assert math_judge("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", timeout=float("nan")) is False


def test_worker_is_restarted_after_a_timeout():
    _warm()
    before = judge._POOL.pids()
    start = time.perf_counter()
    assert math_judge(BIG_POWER, "5", timeout=SHORT_TIMEOUT_S) is False
    assert time.perf_counter() - start <= SHORT_TIMEOUT_S + SLACK_S
    assert _wait_gone(before) == []  # the stuck worker was killed ...
    assert math_judge("\\boxed{\\sqrt{12}}", "2\\sqrt{3}") is True  # ... and a new one judges
    assert set(judge._POOL.pids()).isdisjoint(before)


def test_batch_goes_on_after_a_timeout_in_the_middle():
    predictions = ["\\boxed{\\sqrt{12}}", BIG_POWER, "\\boxed{\\frac{2}{4}}", "\\boxed{3}"]
    solutions = ["2\\sqrt{3}", "5", "0.5", "4"]
    verdicts = math_judge_batch(predictions, solutions, timeout=SHORT_TIMEOUT_S)
    assert verdicts == [True, False, True, False]


def test_batch_rejects_unpaired_lists():
    with pytest.raises(ValueError, match="2 predictions and 1 solutions"):
        math_judge_batch(["\\boxed{1}", "\\boxed{2}"], ["1"])


# Cases for the thread / fork / subprocess checks: one of each kind of verdict, and a timeout.
CROSS_CASES = [
    ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}"),
    ("\\boxed{60°}", "60"),
    ("\\boxed{12.57}", "4\\pi"),
    ("no box", "5"),
    (BIG_POWER, "5"),
    ("\\boxed{x = 5}", "5"),
]
CROSS_EXPECTED = [True, True, False, False, False, True]


def _judge_timed(cases):
    results, slowest = [], 0.0
    for prediction, solution in cases:
        start = time.perf_counter()
        results.append(math_judge(prediction, solution, timeout=SHORT_TIMEOUT_S))
        slowest = max(slowest, time.perf_counter() - start)
    return results, slowest


def test_math_judge_from_a_thread():
    _warm()
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(run=_judge_timed(CROSS_CASES)))
    thread.start()
    thread.join(timeout=60)
    results, slowest = outcome["run"]
    assert results == CROSS_EXPECTED
    # The case after the timeout waits for the replacement worker's start: not judging time.
    assert slowest <= SHORT_TIMEOUT_S + SLACK_S


def test_math_judge_from_a_forked_child_uses_its_own_worker():
    _warm()
    parent_workers = judge._POOL.pids()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child reports and leaves without running pytest's teardown
        try:
            results = [math_judge(p, s, timeout=SHORT_TIMEOUT_S) for p, s in CROSS_CASES]
            report = {"results": results, "workers": judge._POOL.pids()}
            shutdown_judge_workers()
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        report = json.loads(pipe.read())
    os.waitpid(child, 0)
    assert report["results"] == CROSS_EXPECTED
    assert set(report["workers"]).isdisjoint(parent_workers)
    assert _wait_gone(report["workers"]) == []
    assert math_judge("\\boxed{0.5}", "\\frac{1}{2}") is True  # the parent's worker still works


_SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from maye_pl.rewards import math_judge
    from maye_pl.rewards import judge
    cases = json.loads(sys.argv[1])
    results, slowest = [], 0.0
    for prediction, solution in cases:
        start = time.perf_counter()
        results.append(math_judge(prediction, solution, timeout=float(sys.argv[2])))
        slowest = max(slowest, time.perf_counter() - start)
    report = {"results": results, "slowest": slowest, "workers": judge._POOL.pids()}
    print(json.dumps(report), flush=True)
    if sys.argv[3] == "hang":
        time.sleep(600)
    """
)


def _start_judging_subprocess(mode: str) -> subprocess.Popen:
    cases = json.dumps(CROSS_CASES)
    args = [sys.executable, "-c", _SUBPROCESS_SCRIPT, cases, str(SHORT_TIMEOUT_S), mode]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_math_judge_in_a_fresh_interpreter_and_no_orphan_after_exit():
    process = _start_judging_subprocess("exit")
    output, _ = process.communicate(timeout=120)
    report = json.loads(output)
    assert process.returncode == 0
    assert report["results"] == CROSS_EXPECTED
    assert report["slowest"] <= SHORT_TIMEOUT_S + SLACK_S + 60  # includes the first worker start
    assert report["workers"] and _wait_gone(report["workers"]) == []  # closed at exit


@pytest.mark.slow
def test_worker_dies_with_a_sigkilled_owner():
    process = _start_judging_subprocess("hang")
    try:
        report = json.loads(process.stdout.readline())
        assert report["workers"] and all(_running(pid) for pid in report["workers"])
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert _wait_gone(report["workers"]) == []  # PDEATHSIG: no atexit ran, no orphan


def test_shutdown_leaves_no_worker_and_the_next_call_starts_one():
    _warm()
    workers = judge._POOL.pids()
    assert workers
    shutdown_judge_workers()
    assert judge._POOL.pids() == []
    assert _wait_gone(workers) == []
    shutdown_judge_workers()  # twice is fine
    assert math_judge("\\boxed{\\frac{6}{4}}", "1.5") is True

"""The math judge's worker process: math-verify on one (golden, predicted) answer pair per line.

Run as a script (``python _judge_worker.py PARENT_PID``), never as ``-m maye_pl...``: importing
the ``maye_pl`` package would import torch, and this process needs math-verify only, so that it
starts in about half a second. ``maye_pl/rewards/judge.py`` starts it, bounds every answer with
its own deadline and kills it when one runs over; there is no time limit in here.

Protocol on stdin/stdout, one line each way per pair:
    parent -> worker   JSON ``[golden, predicted]`` (answers already extracted and normalised), or
                       ``[first, second, "sentences"]``: two texts parsed as they are, MAYE's call
                       ``verify(parse(first), parse(second))`` (``maye_judge``)
    worker -> parent   ``1`` (equivalent) or ``0`` (not, or math-verify failed)
The worker writes ``ready`` once its imports are done, and exits when stdin closes.
"""

import json
import logging
import os
import resource
import signal
import sys

# A PDEATHSIG-killed worker cannot outlive the process that owns it, even when that process
# is SIGKILLed while the worker is stuck in one long C-level big-integer operation (which no
# Python-level signal handler or watchdog thread could interrupt).
_PR_SET_PDEATHSIG = 1
# Judging a real answer peaks under 100 MB of address space. "2^{2^{2^{2^{2^{2}}}}}" makes sympy
# allocate hundreds of MB per second until killed; with this cap it hits MemoryError (judged
# False) instead of taking memory from the training processes.
_ADDRESS_SPACE_LIMIT = 2 << 30


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def _equivalent(golden: str, predicted: str, mode: list[str], parse, verify) -> bool:
    if mode != ["sentences"]:
        # Wrapping in \boxed makes math-verify read exactly this answer (boxed has top priority),
        # not some other number it would find in the text.
        golden, predicted = "\\boxed{" + golden + "}", "\\boxed{" + predicted + "}"
    gold = parse(golden, parsing_timeout=None)
    pred = parse(predicted, parsing_timeout=None)
    return bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))


def main() -> None:
    del sys.path[0]  # this script's folder: its sibling modules must not shadow real packages
    _die_with_parent(int(sys.argv[1]))
    # Ctrl-C reaches the whole process group; the parent decides when this worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_AS, (_ADDRESS_SPACE_LIMIT, _ADDRESS_SPACE_LIMIT))
    # With timeouts disabled math-verify warns once; failures it catches are logged at WARNING.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from math_verify import parse, verify

    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        try:
            golden, predicted, *mode = json.loads(line)
            answer = _equivalent(golden, predicted, mode, parse, verify)
        except Exception:  # noqa: BLE001 - a pair math-verify cannot handle is simply not equal
            answer = False
        out.write(b"1\n" if answer else b"0\n")
        out.flush()


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # the parent closed the pipes (shutdown) while this one was talking
        os._exit(0)

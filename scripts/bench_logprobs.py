"""Benchmark ``maye_pl.rl.token_logprobs`` against the naive ``log_softmax(...).gather(...)``.

    python scripts/bench_logprobs.py                       # T=1024, V=32k and 152k, fp32 + bf16
    python scripts/bench_logprobs.py --quick               # T=256
    python scripts/bench_logprobs.py --rows 8 --repeats 3  # N=8 for both vocabularies
    python scripts/bench_logprobs.py --device cuda --tokens 2048 --rows 4  # on a GPU

Notation: N response rows, T response tokens, V vocabulary.

Each case times and measures three ways of scoring (N, T) tokens from (N, T, V) logits, with grad
(forward + backward, as in the PPO loss) and without (old/ref log-probs):

- ``naive``: ``log_softmax(logits.float() / temp).gather(...)``, the baseline every ratio uses;
- ``fused``: ``token_logprobs(logits, ids, temp)`` (gather the token's logit, subtract logsumexp);
- ``chunked``: the same with ``chunk_size`` positions of T at a time.

The "extra / L" column gives the peak in units of L = N*T*V*4 bytes, the logits upcast to fp32
(with grad it includes the logits' own gradient: L in fp32, L/2 in bf16, the same for every
variant).

Memory method: peak extra resident memory of this process (Linux). Before each run the script
returns freed heap to the OS (``malloc_trim``) and resets the kernel's high-water mark
(``echo 5 > /proc/self/clear_refs``); after it, extra = ``VmHWM - VmRSS before``. This sees every
allocation the run touches (torch's CPU allocator, Python objects, serialized bytes), unlike
``tracemalloc``, and catches transient peaks that polling would miss. glibc's mmap threshold is
pinned at 1 MiB (``mallopt``): every block of 1 MiB or more is its own mapping, returned to the OS
when freed, so RSS follows the live tensors (glibc's default raises the threshold after the first
large free and then serves such blocks from a heap that keeps freed pages resident: measured, it
inflated a chunked backward's peak by ~1.6 L).

On ``--device cuda`` the peak is the CUDA caching allocator's ``max_memory_allocated`` above the
allocation at the start of the run, and each run ends with ``torch.cuda.synchronize()``.

Time: median wall time of ``--repeats`` runs (the first run is not discarded: every run touches
fresh pages, so none is "warm"). The machine's other load makes times noisy; ratios of runs taken
back to back in one process are the numbers to read.

``PeakRSS``, ``measure``, ``print_table`` and ``ratio`` also serve ``bench_weight_sync.py`` and
``bench_engines.py``, which import them from this file (scripts/ is on ``sys.path`` when a
script in it runs).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from maye_pl.rl.logprobs import token_logprobs

MiB = 2**20
QWEN2_5_VL_VOCAB = 152064  # Qwen2.5-VL's padded vocabulary (its lm_head rows)


# ------------------------------------------------------------------------------------ measuring


def _proc_status_bytes(key: str) -> int:
    """``key`` (e.g. ``"VmHWM"``) from /proc/self/status, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise RuntimeError(
        f"/proc/self/status has no {key!r} line; this benchmark measures memory on Linux only."
    )


class PeakRSS:
    """Context manager: ``extra`` = peak resident bytes inside the block above RSS at its start."""

    _libc = ctypes.CDLL("libc.so.6")
    _M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)

    def __enter__(self) -> PeakRSS:
        if not self._libc.mallopt(self._M_MMAP_THRESHOLD, MiB):
            raise RuntimeError("mallopt(M_MMAP_THRESHOLD, 1 MiB) failed; glibc is required.")
        gc.collect()
        self._libc.malloc_trim(0)  # give freed heap back, so RSS at entry is what is really held
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # 5: reset VmHWM to the current RSS (Linux >= 4.0)
        except OSError as error:
            raise RuntimeError(
                f"cannot reset the peak RSS through /proc/self/clear_refs ({error}); run the "
                "benchmark on Linux >= 4.0 outside a sandbox that hides /proc."
            ) from error
        self.start = _proc_status_bytes("VmRSS")
        self.extra = 0
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.extra = _proc_status_bytes("VmHWM") - self.start


class PeakCUDA:
    """Context manager: ``extra`` = peak CUDA bytes allocated inside the block above the start."""

    def __enter__(self) -> PeakCUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        self.extra = 0
        return self

    def __exit__(self, *exc_info: object) -> None:
        torch.cuda.synchronize()
        self.extra = torch.cuda.max_memory_allocated() - self.start


def measure(run: Callable[[], object], repeats: int, device: str = "cpu") -> tuple[float, int]:
    """Median wall seconds and largest peak extra bytes of ``run()`` over ``repeats`` calls.

    ``run``'s return value is dropped inside the measured block, so what it returns counts too.
    Peak bytes are resident memory on the CPU, allocated CUDA memory on ``device="cuda"``.
    """
    peak_meter = PeakCUDA if device == "cuda" else PeakRSS
    seconds, peaks = [], []
    for _ in range(repeats):
        with peak_meter() as peak:
            start = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        peaks.append(peak.extra)
    return statistics.median(seconds), max(peaks)


def print_table(header: list[str], rows: list[list[object]]) -> None:
    """Print ``rows`` as an aligned plain-text (also Markdown-pasteable) table."""
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines), flush=True)


def ratio(value: float, baseline: float) -> str:
    """``value / baseline`` to two decimals ("n/a" when the baseline is 0)."""
    return f"{value / baseline:.2f}" if baseline else "n/a"


# ------------------------------------------------------------------------------------ the cases


def naive_logprobs(logits: Tensor, token_ids: Tensor, temperature: float) -> Tensor:
    """The baseline: a full (N, T, V) fp32 log-softmax, then the token's entry. Returns (N, T)."""
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)  # (N, T, V)
    return log_p.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)  # (N, T)


@dataclass(frozen=True)
class Case:
    """One logits shape and dtype."""

    N: int
    T: int
    V: int
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"N={self.N} T={self.T} V={self.V} {str(self.dtype).removeprefix('torch.')}"

    @property
    def logits_mib(self) -> float:
        return self.N * self.T * self.V * torch.finfo(self.dtype).bits / 8 / MiB

    @property
    def fp32_logits_bytes(self) -> int:
        """L: the size of the logits upcast to fp32, the unit peak memory comes in."""
        return self.N * self.T * self.V * 4


def cases(quick: bool, rows: int | None, tokens: int | None) -> list[Case]:
    """The benchmarked shapes: V=32k and Qwen2.5-VL's V=152k, each in fp32 and bf16.

    Default N (2 at V=32k, 1 at V=152k) keeps the fp32 logits at 256 / 594 MiB, so the grad runs
    (3-4x the logits) fit, and the whole script runs in minutes, on a shared 2-core 24 GiB box.
    """
    T = tokens or (256 if quick else 1024)
    return [
        Case(rows or N, T, V, dtype)
        for N, V in ((2, 32768), (1, QWEN2_5_VL_VOCAB))
        for dtype in (torch.float32, torch.bfloat16)
    ]


def bench_case(
    case: Case, chunk_size: int, temperature: float, repeats: int, device: str = "cpu"
) -> list[list[object]]:
    """Table rows (one per mode and variant) for ``case``, ratios against ``naive`` last."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(case.N, case.T, case.V, generator=generator).to(device, case.dtype)  # (N, T, V)
    token_ids = torch.randint(case.V, (case.N, case.T), generator=generator).to(device)  # (N, T)
    variants: dict[str, Callable[[Tensor], Tensor]] = {
        "naive": lambda x: naive_logprobs(x, token_ids, temperature),
        "fused": lambda x: token_logprobs(x, token_ids, temperature),
        f"chunked({chunk_size})": lambda x: token_logprobs(x, token_ids, temperature, chunk_size),
    }
    with torch.no_grad():
        reference = variants["naive"](logits)  # (N, T)
        errors = {name: (f(logits) - reference).abs().max().item() for name, f in variants.items()}
    del reference

    leaf = logits.requires_grad_(True)

    def with_grad(score: Callable[[Tensor], Tensor]) -> Callable[[], None]:
        def run() -> None:
            score(leaf).sum().backward()
            leaf.grad = None  # (N, T, V): counted in the peak, the same for every variant

        return run

    def no_grad(score: Callable[[Tensor], Tensor]) -> Callable[[], Tensor]:
        return torch.no_grad()(lambda: score(leaf))

    rows = []
    for mode, wrap in (("grad", with_grad), ("no_grad", no_grad)):
        results = {name: measure(wrap(f), repeats, device) for name, f in variants.items()}
        base_s, base_bytes = results["naive"]
        for name, (seconds, extra) in results.items():
            rows.append(
                [case.name, f"{case.logits_mib:.0f}", mode, name, f"{errors[name]:.1e}",
                 seconds, f"{extra / MiB:.0f}", f"{extra / case.fp32_logits_bytes:.2f}",
                 ratio(seconds, base_s), ratio(extra, base_bytes)]
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T=256 instead of 1024")
    parser.add_argument("--rows", type=int, default=None, help="N for every case (default 2 / 1)")
    parser.add_argument("--tokens", type=int, default=None, help="T (default 1024, quick 256)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant")
    parser.add_argument("--chunk-size", type=int, default=128, help="T positions per chunk")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the logits live")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {args.repeats} "
          f"repeats, temperature {args.temperature}; ratios are variant / naive in the same mode",
          flush=True)
    rows = []
    for case in cases(args.quick, args.rows, args.tokens):
        rows += bench_case(case, args.chunk_size, args.temperature, args.repeats, args.device)
        print(f"  done: {case.name}", flush=True)
    print_table(
        ["case", "logits MiB", "mode", "variant", "max |err|", "time s", "peak extra MiB",
         "extra / L", "time ratio", "memory ratio"],
        rows,
    )


if __name__ == "__main__":
    main()

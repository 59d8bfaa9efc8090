"""Global whitening over two gloo ranks equals whitening the concatenated batch in one process;
per-rank (maye_compat) whitening does not."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from maye_pl.rl.advantages import masked_whiten, reinforce_pp_advantages

WORLD = 2


def _batch():
    """Rows 0-2 go to rank 0, rows 3-5 to rank 1; the halves have different means on purpose."""
    gen = torch.Generator().manual_seed(7)
    lengths = torch.tensor([4, 1, 3, 2, 4, 3])
    mask = torch.arange(4).unsqueeze(0) < lengths.unsqueeze(1)  # (6, 4)
    lp = -torch.rand(6, 4, generator=gen)
    ref = lp + 0.1 * torch.randn(6, 4, generator=gen)
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.2])
    return scores, lp, ref, mask


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        scores, lp, ref, mask = _batch()
        rows = slice(3 * rank, 3 * rank + 3)
        group = dist.group.WORLD
        kwargs = dict(kl_coef=0.1, gamma=1.0)
        results = {
            "whiten_global": masked_whiten(lp[rows], mask[rows], group=group),
            "adv_global": reinforce_pp_advantages(
                scores[rows], lp[rows], ref[rows], mask[rows], group=group, **kwargs
            )[0],
            # maye_compat ignores the group: statistics of this rank's rows only.
            "adv_maye": reinforce_pp_advantages(
                scores[rows], lp[rows], ref[rows], mask[rows], maye_compat=True, group=group,
                **kwargs,
            )[0],
        }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_global_whitening_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    gathered = {key: torch.cat([res[key] for res in per_rank]) for key in per_rank[0]}

    scores, lp, ref, mask = _batch()
    kwargs = dict(kl_coef=0.1, gamma=1.0)
    torch.testing.assert_close(gathered["whiten_global"], masked_whiten(lp, mask))
    full_adv, _ = reinforce_pp_advantages(scores, lp, ref, mask, **kwargs)
    torch.testing.assert_close(gathered["adv_global"], full_adv)

    # MAYE's per-rank statistics (mean added back) are not the global ones.
    local = torch.cat(
        [
            reinforce_pp_advantages(
                scores[rows], lp[rows], ref[rows], mask[rows], maye_compat=True, **kwargs
            )[0]
            for rows in (slice(0, 3), slice(3, 6))
        ]
    )
    torch.testing.assert_close(gathered["adv_maye"], local)
    full_maye, _ = reinforce_pp_advantages(scores, lp, ref, mask, maye_compat=True, **kwargs)
    assert not torch.allclose(local, full_maye, atol=1e-3)
    # Per-rank zero-mean whitening also differs from the global one.
    local_zero_mean = torch.cat(
        [masked_whiten(lp[rows], mask[rows]) for rows in (slice(0, 3), slice(3, 6))]
    )
    assert not torch.allclose(local_zero_mean, gathered["whiten_global"], atol=1e-3)

"""Generate the synthetic vision-dominant geometry set (MAYE jsonl format) used by the demo.

    python scripts/make_synthetic_geometry.py                       # datasets/demo_geometry
    python scripts/make_synthetic_geometry.py --out /tmp/geo --n-train 512 --seed 1

Prints the split → jsonl paths. Refuses to overwrite an existing directory unless --reuse is
given, in which case a directory generated with the same arguments is kept as it is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from maye_pl.data.geometry import ensure_geometry_dataset, generate_geometry_dataset

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "datasets" / "demo_geometry"


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--n-train", type=int, default=256, help="training samples")
    parser.add_argument("--n-val", type=int, default=64, help="validation samples")
    parser.add_argument("--n-test", type=int, default=64, help="test samples")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (same bytes)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep an existing directory generated with the same arguments")
    args = parser.parse_args(argv)
    make = ensure_geometry_dataset if args.reuse else generate_geometry_dataset
    try:
        paths = make(args.out, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                     seed=args.seed)
    except FileExistsError as exc:
        parser.error(f"{exc} (here: pass --reuse)")
    for split, path in paths.items():
        print(f"{split}: {path}")
    return paths


if __name__ == "__main__":
    main()

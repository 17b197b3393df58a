"""How close ``cxrcam synth --profile vinbig|nih`` comes to the released tables (issue 35's goals).

Synthesizes ``--n-images`` images of each profile (a fixed seed; small images, since only the label
tables are compared) and sets their figures beside the release's (``cxrcam.data.profiles``): every
VinBigData class's share of the boxes, boxes and distinct findings per abnormal image, the normal
share, the 1/2/3-reader shares; every NIH class's prevalence and each boxed class's median relative
box area. ``--profile uniform`` shows the generator of before against the same goals.

    python scripts/bench_world.py --n-images 3000
    python scripts/bench_world.py --n-images 3000 --profile uniform
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

from cxrcam.data.profiles import compare_nih, compare_vinbig, load_profile, nih_figures, vinbig_figures
from cxrcam.data.synth import synthesize

SIDE = 128  # image side: only the label tables are compared (NIH boxes as shares of it)


def world(n: int, seed: int, profile: str | None, folder: Path) -> dict[str, list]:
    """Each format's comparison rows for a synthetic set of ``n`` images."""
    vinbig = synthesize("vinbig", folder / "vinbig", n, seed=seed, size=SIDE, progress=False, profile=profile)
    nih = synthesize("nih", folder / "nih", n, seed=seed, size=SIDE, progress=False, profile=profile)
    boxes = pd.read_csv(nih / "BBox_List_2017.csv")
    return {"vinbig": compare_vinbig(vinbig_figures(pd.read_csv(vinbig / "train.csv")),
                                     load_profile("vinbig")["figures"]),
            "nih": compare_nih(nih_figures(pd.read_csv(nih / "Data_Entry_2017.csv"), boxes, side=SIDE),
                               load_profile("nih")["figures"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=35)
    parser.add_argument("--profile", choices=["uniform"], default=None, help="the old generator instead")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = world(a.n_images, a.seed, a.profile, Path(tmp))
    print(f"command: {' '.join(sys.argv)}\n")
    for fmt, compared in rows.items():
        print(f"| {fmt}: figure | synthetic | released table | ratio | goal | met |\n|---|---|---|---|---|---|")
        for r in compared:
            ratio = f"{r.synthetic / r.real:.2f}" if r.real else "-"
            print(f"| {r.figure} | {r.synthetic:.3f} | {r.real:.3f} | {ratio} | {r.tolerance} | "
                  f"{'yes' if r.ok else 'NO'} |")
        print(f"\n{sum(r.ok for r in compared)} of {len(compared)} goals met\n")


if __name__ == "__main__":
    main()

"""Rebuild the statistics ``cxrcam synth --profile`` draws from (``cxrcam/data/profiles/*.json``) from
the released tables: VinBigData's ``train.csv``, NIH's ``Data_Entry_2017`` + ``BBox_List_2017`` and RSNA's
``stage_2_train_labels.csv``.
No table row ships; see ``cxrcam.data.profiles`` for what is kept and the frame VinBigData boxes
are measured in.

    python scripts/build_profiles.py --tables ../shared/data/tables            # writes the shipped files
    python scripts/build_profiles.py --tables ../shared/data/tables --out /tmp/p
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from cxrcam.data.profiles import PROFILES, derive_nih, derive_rsna, derive_vinbig, write_profile


def build(tables: Path, out: Path) -> list[Path]:
    """The profiles from the tables in ``tables``, written to ``out``; the files written."""
    out.mkdir(parents=True, exist_ok=True)
    vinbig = derive_vinbig(pd.read_csv(tables / "vinbigdata-train.csv.gz"))
    nih = derive_nih(pd.read_csv(tables / "Data_Entry_2017_v2020.csv.gz"), pd.read_csv(tables / "BBox_List_2017.csv.gz"))
    rsna = derive_rsna(pd.read_csv(tables / "stage_2_train_labels.csv.zip"))
    written = []
    for profile in (vinbig, nih, rsna):
        path = out / f"{profile['dataset']}.json"
        write_profile(profile, path)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", type=Path, required=True, help="the folder of the released tables")
    parser.add_argument("--out", type=Path, default=PROFILES)
    a = parser.parse_args()
    for path in build(a.tables, a.out):
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()

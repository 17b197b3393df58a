"""Shared fixtures: the real data in ../shared/data and small synthetic datasets."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def vinbig_table() -> pd.DataFrame:
    return pd.read_csv(shared("tables", "vinbigdata-train.csv.gz"))


@pytest.fixture(scope="session")
def synth_vinbig(tmp_path_factory) -> Path:
    """60 synthetic VinBigData-layout images, shared by the tests that only read them."""
    from cxrcam.data.synth import synthesize

    return synthesize("vinbig", tmp_path_factory.mktemp("vinbig"), 60, seed=7, size=192, progress=False)


@pytest.fixture(scope="session")
def synth_nih(tmp_path_factory) -> Path:
    from cxrcam.data.synth import synthesize

    return synthesize("nih", tmp_path_factory.mktemp("nih"), 40, seed=7, size=160, progress=False)

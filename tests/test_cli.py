"""The command line as a user meets it: help, version, errors as one line."""
from __future__ import annotations

from functools import partial

import pandas as pd
import pytest

from conftest import cxrcam as run_cxrcam


cxrcam = partial(run_cxrcam, timeout=300)


def test_help_lists_every_command_and_version():
    out = cxrcam("--help")
    assert out.returncode == 0
    for command in ("synth", "prepare"):
        assert f"  {command} " in out.stdout
    from cxrcam import __version__

    assert __version__ in cxrcam("--version").stdout


@pytest.mark.parametrize("args, message", [
    (["prepare", "--dataset", "nih", "--root", "/no/such/dir", "--out", "x"], "'/no/such/dir' does not exist"),
    (["prepare", "--dataset", "nih", "--root", ".", "--out", "x"], "no Data_Entry_2017"),
    (["prepare", "--dataset", "vinbig", "--root", ".", "--out", "x", "--config", "nope.yaml"],
     "'nope.yaml' does not exist"),
])
def test_user_mistakes_give_one_line(tmp_path, args, message):
    out = cxrcam(*args, cwd=tmp_path)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len([line for line in out.stderr.splitlines() if line.strip()]) <= 3  # click's usage hint + one error


def test_wrong_column_and_bad_override(synth_vinbig, tmp_path):
    table = pd.read_csv(synth_vinbig / "train.csv").rename(columns={"rad_id": "reader"})
    root = tmp_path / "d"
    (root / "train").mkdir(parents=True)
    table.to_csv(root / "train.csv", index=False)
    out = cxrcam("prepare", "--dataset", "vinbig", "--root", str(root), "--out", str(tmp_path / "c"))
    assert out.returncode == 1 and "missing column(s) rad_id" in out.stderr and "Traceback" not in out.stderr
    out = cxrcam("prepare", "--dataset", "vinbig", "--root", str(synth_vinbig), "--out", str(tmp_path / "c"),
                 "fusion.iou=0.3")
    assert out.returncode == 1 and "unknown config key 'fusion.iou'" in out.stderr


def test_synth_then_prepare_from_the_command_line(tmp_path):
    assert cxrcam("synth", "--format", "nih", "--out", str(tmp_path / "d"), "--n-images", "12",
                  "--size", "96").returncode == 0
    out = cxrcam("prepare", "--dataset", "nih", "--root", str(tmp_path / "d"), "--out", str(tmp_path / "c"),
                 "--size", "64", "split.n_folds=3")
    assert out.returncode == 0, out.stderr
    manifest = pd.read_csv(tmp_path / "c" / "manifest.csv")
    assert len(manifest) == 12 and set(manifest["fold"]) <= {-1, 0, 1, 2}


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    """Atomic writes (mkstemp + rename) get the mode a plain open() would: colleagues and web
    servers can read submission.csv, report.html and checkpoints under the usual umask."""
    import os
    import subprocess
    import sys

    data, out = tmp_path / "synth", tmp_path / "cache"
    for args in (["synth", "--out", str(data), "--n-images", "6", "--size", "64"],
                 ["prepare", "--dataset", "vinbig", "--root", str(data), "--out", str(out), "--size", "32",
                  "split.n_folds=2"]):
        result = subprocess.run([sys.executable, "-m", "cxrcam", *args], capture_output=True, text=True,
                                timeout=300, umask=umask)
        assert result.returncode == 0, result.stderr[-2000:]
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".csv" for p in written)
    assert {oct(os.stat(p).st_mode & 0o777) for p in written} == {oct(mode)}

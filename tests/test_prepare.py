"""`cxrcam prepare`: the cache, exact box frames, failures, resume after a kill."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrcam.config import load_config
from cxrcam.data.cache import open_cache, prepare
from cxrcam.data.images import read_image
from cxrcam.data.readers import read_dataset
from cxrcam.data.synth import synthesize
from cxrcam.errors import CxrcamError
from cxrcam.schemas import VINBIG

from conftest import shared


def test_cache_images_and_boxes_in_both_frames(synth_vinbig, tmp_path):
    config = load_config(overrides=["prepare.size=96", "prepare.workers=2"])
    result = prepare("vinbig", synth_vinbig, tmp_path / "cache", config, progress=False)
    assert (result.cached, result.failed) == (60, 0)
    cache = open_cache(tmp_path / "cache")
    assert cache.schema is VINBIG and cache.size == 96 and len(cache.images) == 60
    tables = read_dataset("vinbig", synth_vinbig)
    row = cache.images.iloc[5]
    src = tables.images.set_index("image_id").loc[row["image_id"]]
    assert (row["width"], row["height"]) == (src["width"], src["height"])  # original size recorded
    img = cache.load(row["image_id"])
    assert img.shape == (96, 96)
    assert np.array_equal(img, read_image(src["path"], 96).image)  # what the decoder makes, no more loss
    # boxes: the same fused truth, and the cache frame maps back to original pixels exactly
    assert len(cache.boxes) == len(tables.boxes)
    merged = cache.boxes.merge(cache.images[["image_id", "scale_x", "scale_y"]], on="image_id")
    assert np.allclose(merged["cx_min"] / merged["scale_x"], merged["x_min"], rtol=0, atol=1e-9)
    assert np.allclose(merged["cy_max"] / merged["scale_y"], merged["y_max"], rtol=0, atol=1e-9)
    assert (merged["cx_max"] <= 96 + 1e-6).all()
    assert set(cache.images["fold"]) == set(range(5))


def test_corrupt_and_missing_images_are_reported_and_the_rest_complete(synth_vinbig, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth_vinbig, root)
    files = sorted((root / "train").glob("*.dicom"))
    files[0].write_bytes(b"garbage")
    files[1].write_bytes(files[1].read_bytes()[:2000])  # truncated pixel data
    files[2].unlink()
    result = prepare("vinbig", root, tmp_path / "cache", load_config(overrides=["prepare.size=64"]), progress=False)
    assert (result.cached, result.failed) == (57, 3)
    cache = open_cache(tmp_path / "cache")
    failures = cache.failures.set_index("image_id")
    assert set(failures.index) == {f.stem for f in files[:3]}
    assert "not a DICOM" in failures.loc[files[0].stem, "reason"]
    assert failures.loc[files[2].stem, "reason"] == "file not found"
    assert len(cache.images) == 57 and not set(failures.index) & set(cache.images["image_id"])
    assert not set(failures.index) & set(cache.boxes["image_id"])


def test_rerun_skips_and_other_size_refused(synth_nih, tmp_path):
    config = load_config(overrides=["prepare.size=64", "prepare.workers=1"])
    prepare("nih", synth_nih, tmp_path / "c", config, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c" / "images").iterdir()}
    again = prepare("nih", synth_nih, tmp_path / "c", config, progress=False)
    assert (again.cached, again.skipped) == (0, 40)
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c" / "images").iterdir()}
    with pytest.raises(CxrcamError, match="at 64 px.*--overwrite"):
        prepare("nih", synth_nih, tmp_path / "c", load_config(overrides=["prepare.size=128"]), progress=False)
    # another dataset into the same folder: counted as itself (the old images are named, not counted) ...
    other = synthesize("nih", tmp_path / "other", 20, seed=99, size=96, progress=False)
    with pytest.warns(UserWarning, match="21 cached image\\(s\\) are not in this dataset"):  # 19 ids are in both
        mixed = prepare("nih", other, tmp_path / "c", config, progress=False)
    assert (mixed.cached, mixed.skipped) == (20, 0) and len(open_cache(tmp_path / "c").images) == 20
    # ... and --overwrite starts afresh, at another size too
    fresh = prepare("nih", other, tmp_path / "c", load_config(overrides=["prepare.size=32", "prepare.workers=1"]),
                    progress=False, overwrite=True)
    assert (fresh.cached, fresh.skipped) == (20, 0) and len(list((tmp_path / "c" / "images").iterdir())) == 20
    assert open_cache(tmp_path / "c").size == 32


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_interrupted_run_resumes(tmp_path):
    """SIGKILL a real `cxrcam prepare` half way (the main process only, as the OOM killer does):
    its decoding workers and the resource tracker exit with it; the next run finishes only what
    is left."""
    from cxrcam.data.synth import synthesize

    root = synthesize("vinbig", tmp_path / "data", 150, seed=3, size=384, progress=False)
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "cxrcam", "prepare", "--dataset", "vinbig", "--root", str(root),
           "--out", str(out), "--size", "128", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = out / "progress.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 20):
        time.sleep(0.05)
    helpers = _children(proc.pid)
    assert len(helpers) >= 3  # two workers and the resource tracker
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in helpers):
        time.sleep(0.1)
    assert not [p for p in helpers if _alive(p)], "workers outlived the killed prepare"
    done_before = {json.loads(line)["id"] for line in log.read_text().splitlines() if line.endswith("}")}
    assert 20 <= len(done_before) < 150, "kill landed before or after the run"
    assert not (out / "manifest.csv").exists()
    mtimes = {i: (out / "images" / f"{i}.png").stat().st_mtime_ns for i in done_before}
    # what a worker killed mid-write leaves (the kill may or may not have left one itself)
    (out / "images" / ".0a1b2c.png.k3jd9x2.tmp").write_bytes(b"\x89PNG\r\n\x1a\n partial")
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not list(out.rglob(".*.tmp")), "stale temporaries left in the cache"
    assert "partly written file(s) an interrupted run left" in resumed.stderr
    cache = open_cache(out)
    assert len(cache.images) == 150 and cache.failures.empty
    assert all((out / "images" / f"{i}.png").stat().st_mtime_ns == t for i, t in mtimes.items())
    assert f"{150 - len(done_before)} images ({len(done_before)} already done" in resumed.stdout


def test_real_nih_images(tmp_path):
    result = prepare("nih", shared("nih"), tmp_path / "c", load_config(overrides=["prepare.size=256"]),
                     progress=False)
    assert (result.cached, result.failed) == (47, 0)
    cache = open_cache(tmp_path / "c")
    assert (cache.images["scale_x"] == 0.25).all()
    assert len(cache.boxes) == 12
    raw = pd.read_csv(shared("nih", "BBox_List_2017.csv"))
    box = cache.boxes.iloc[0]
    assert box["cx_min"] == pytest.approx(raw.iloc[0, 2] / 4)


def test_corrupt_cache_files_are_one_line(tmp_path):
    (tmp_path / "cache.json").write_text("{corrupt")
    with pytest.raises(CxrcamError, match="cache.json: corrupt cache description.*prepare` again"):
        open_cache(tmp_path)
    (tmp_path / "cache.json").write_text('{"schema": "vinbig", "size": 64}')
    (tmp_path / "manifest.csv").write_bytes(bytes(range(128, 256)))
    with pytest.raises(CxrcamError, match="manifest.csv: not a readable CSV table"):
        open_cache(tmp_path)
    (tmp_path / "manifest.csv").write_text("image_id,width\na,3\n")
    for name in ("boxes.csv", "failures.csv"):
        (tmp_path / name).write_text("image_id\n")
    with pytest.raises(CxrcamError, match="manifest.csv: missing column.*file, fold"):
        open_cache(tmp_path)


def test_invalid_truth_boxes_are_listed_in_the_cache(synth_vinbig, tmp_path):
    """A box past the image's right edge (its size read from the DICOM) is clipped, a NaN box
    dropped: one warning, the rows in invalid_rows.csv, the cache holds only valid boxes."""
    root = tmp_path / "data"
    shutil.copytree(synth_vinbig, root)
    table = pd.read_csv(root / "train.csv")
    rows = table.index[table["class_id"] < 14][:2]
    width = read_dataset("vinbig", synth_vinbig).images.set_index("image_id")["width"]
    table.loc[rows[0], "x_max"] = width[table.loc[rows[0], "image_id"]] + 50
    table.loc[rows[1], "y_min"] = np.nan
    table.to_csv(root / "train.csv", index=False)
    with pytest.warns(UserWarning, match=r"1 missing coordinate \(dropped\), 1 past the image edge \(clipped to the "
                                         r"image\); listed in .*invalid_rows.csv"):
        prepare("vinbig", root, tmp_path / "cache", load_config(overrides=["prepare.size=32", "fusion.method=reader"]),
                progress=False)
    listed = pd.read_csv(tmp_path / "cache" / "invalid_rows.csv")
    assert listed["row"].tolist() == [rows[0] + 2, rows[1] + 2]
    cache = open_cache(tmp_path / "cache")
    assert (cache.boxes["cx_max"] <= 32 + 1e-9).all() and len(cache.boxes) == (table["class_id"] < 14).sum() - 1

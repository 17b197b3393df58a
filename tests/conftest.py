"""Shared fixtures: the real data in ../shared/data and small synthetic datasets."""
from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def cxrcam(*args: str, process: bool = False, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    """``cxrcam ARGS`` as a user runs it, exit status and output captured: through the real
    command line in this process (torch is imported once for the suite, not 5 s per command),
    or with ``process=True`` (or ``cwd=``/``env=``) as ``python -m cxrcam`` in a new one."""
    if process or kwargs:
        return subprocess.run([sys.executable, "-m", "cxrcam", *args], capture_output=True, text=True,
                              timeout=timeout, **kwargs)
    from cxrcam.cli import run_in_process

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("default")  # as a fresh process shows them, not into pytest's record
        warnings.showwarning = _show_warning
        code = run_in_process(list(args))
    return subprocess.CompletedProcess(["cxrcam", *args], code, out.getvalue(), err.getvalue())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar a run wrote for TensorBoard, read back as TensorBoard reads it: tag -> (step, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


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


def _trained(root: Path, fmt: str, n_images: int, size: int, *overrides: str,
             profile: str | None = None) -> tuple[Path, Path]:
    """A synthetic dataset of ``fmt`` (drawn from ``profile``: its own table by default), its cache at
    ``size`` px and a small classifier trained on it."""
    from cxrcam.config import load_config
    from cxrcam.data.cache import prepare
    from cxrcam.data.synth import synthesize
    from cxrcam.train.classifier import train_classifier

    synthesize(fmt, root / "data", n_images, seed=11, size=int(size * 2.5), progress=False, profile=profile)
    config = load_config("tiny",
                         [f"prepare.size={size}", "train.workers=0", "cam.workers=0", "model.output_stride=32",
                          "model.pooling=avg", *overrides])  # the pooling + linear head the closed-form CAM tests need
    prepare(fmt, root / "data", root / "cache", config, progress=False)
    train_classifier(config, root / "cache", root / "run", progress=False)
    return root / "cache", root / "run" / "best.pt"


@pytest.fixture(scope="session")
def vinbig_model(tmp_path_factory) -> tuple[Path, Path]:
    """(cache, best.pt): resnet10t trained briefly on 160 synthetic VinBigData images at 64 px, in
    bf16 (CPU autocast: the GPU's precision, so localize, calibrate and refine tests run from a
    bf16-trained checkpoint)."""
    return _trained(tmp_path_factory.mktemp("vinbig_model"), "vinbig", 160, 64, "train.epochs=4", "train.batch_size=16",
                    "train.amp=bf16")


@pytest.fixture(scope="session")
def nih_model(tmp_path_factory) -> tuple[Path, Path]:
    """(cache, best.pt): an NIH-schema classifier (test_resnet, 64 px), for the real NIH images. The
    uniform world: a third of its boxable findings have no box, as most of the release's labelled images
    have none (the nih profile boxes every one), so the pseudo-box tests have labelled images to box."""
    return _trained(tmp_path_factory.mktemp("nih_model"), "nih", 60, 64, "model.name=test_resnet", "train.epochs=2",
                    "train.batch_size=16", profile="uniform")


DETECTOR = ["detector.backbone=resnet10t", "detector.epochs=2", "detector.batch_size=16", "detector.workers=0",
            "detector.warmup_iters=3", "detector.rois_per_image=32", "detector.channels=32", "detector.head_size=128",
            "detector.score_thresh=0.001",  # a 2-epoch detector scores low: keep its boxes, whatever the machine
            "detector.amp=bf16"]  # the GPU's precision, through CPU autocast


@pytest.fixture(scope="session")
def vinbig_detector(vinbig_model, tmp_path_factory) -> Path:
    """A run folder of `cxrcam train-detector` (resnet10t, 2 epochs) on vinbig_model's cache."""
    out = tmp_path_factory.mktemp("vinbig_detector") / "det"
    result = cxrcam("train-detector", "--data", str(vinbig_model[0]), "--out", str(out), *DETECTOR, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def uneven_folder(vinbig_model, tmp_path_factory) -> tuple[Path, float]:
    """(a plain folder of 3 of vinbig_model's DICOMs, an operating point boxes.min_prob): ``a`` and
    ``c`` have a class above it, ``b`` is a normal image with none. Under torchrun with 2 ranks and
    batch 2, rank 0 takes a and c (fewer images than ranks x batch) and rank 1 takes b alone: a
    whole shard that needs no class map."""
    import shutil

    from cxrcam.data.cache import open_cache
    from cxrcam.train.classifier import predict

    cache_dir, ckpt = vinbig_model
    cache = open_cache(cache_dir)
    top = predict(ckpt, cache_dir, workers=0, progress=False).set_index("image_id").max(axis=1)
    boxed = set(cache.boxes["image_id"])
    normal = top[~top.index.isin(boxed)].sort_values()
    abnormal = top[top.index.isin(boxed)].sort_values(ascending=False)
    min_prob = float(normal.iloc[0] + abnormal.iloc[1]) / 2  # between b's highest class and a's, c's
    assert abnormal.iloc[1] > normal.iloc[0], "no normal image scores below two abnormal ones"
    folder = tmp_path_factory.mktemp("uneven")
    for name, image_id in zip("abc", (abnormal.index[0], normal.index[0], abnormal.index[1])):
        shutil.copy(cache_dir.parent / "data" / "train" / f"{image_id}.dicom", folder / f"{name}.dicom")
    return folder, min_prob

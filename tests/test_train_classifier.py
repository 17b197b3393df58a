"""`cxrcam train-classifier` and `predict`: outputs, exact resume after a kill, torchrun/DDP."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import cxrcam, tensorboard_scalars
from cxrcam.config import SHIPPED, load_config
from cxrcam.data.cache import open_cache, prepare
from cxrcam.data.synth import synthesize
from cxrcam.errors import CxrcamError
from cxrcam.files import save_checkpoint
from cxrcam.data.tables import target_columns
from cxrcam.evaluation.classification import operating_points
from cxrcam.models import decision_thresholds, load_classifier
from cxrcam.train.classifier import train_classifier
from cxrcam.train.engine import best_epoch

CONFIGS = SHIPPED  # the configs the package ships
NO_AUGMENT = ["augment.degrees=0", "augment.translate=0", "augment.scale=0", "augment.brightness=0",
              "augment.contrast=0"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    synthesize("vinbig", root / "data", 110, seed=5, size=96, progress=False)
    prepare("vinbig", root / "data", root / "cache", load_config(overrides=["prepare.size=48"]), progress=False)
    return root / "cache"


def tiny(*extra: str):
    return ["model.name=test_resnet", "train.epochs=2", "train.batch_size=8", "train.workers=0",
            "train.lr=3e-3", "train.warmup_epochs=0.5", *extra]


def test_run_folder_and_predict(cache, tmp_path):
    config = load_config(overrides=tiny("train.pos_weight=true", "train.soft_targets=true"))
    metrics = train_classifier(config, cache, tmp_path / "run", progress=False)
    table = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(table["epoch"]) == [1, 2]
    assert {"train_loss", "val_loss", "val_mean_auroc", "auroc_Cardiomegaly", "lr", "data_wait"} <= set(table.columns)
    assert table["train_loss"].iloc[1] < table["train_loss"].iloc[0]  # it learns something
    assert metrics["epoch"] == 2
    # best.pt is self-contained: localize/predict need nothing else
    model, ckpt = load_classifier(tmp_path / "run" / "best.pt")
    assert ckpt["model_name"] == "test_resnet" and ckpt["input_size"] == 48 and len(ckpt["classes"]) == 14
    assert ckpt["precision"] == "fp32" and (table["precision"] == "fp32").all()  # train.amp=auto on a CPU
    assert ckpt["mean"] == pytest.approx(model.mean.flatten().tolist()) and ckpt["config"]["train"]["epochs"] == 2
    assert ckpt["metrics"]["val_mean_auroc"] == pytest.approx(table["val_mean_auroc"].max())
    assert metrics["best"]["epoch"] == ckpt["epoch"]  # what the command prints is the epoch in best.pt, from 1
    # TensorBoard events (`tensorboard --logdir runs/`) hold the same figures per epoch
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    for key in ("train_loss", "val_loss", "val_mean_auroc"):
        steps, values = zip(*scalars[key])
        assert list(steps) == list(table["epoch"]) and values == pytest.approx(list(table[key]), rel=1e-5), key
    curves = cv2.imread(str(tmp_path / "run" / "curves.png"))
    assert curves is not None and curves.shape[0] > 200 and curves.std() > 10
    # predict from the command line equals the model applied to the cached images
    out = cxrcam("predict", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--data", str(cache),
                 "--out", str(tmp_path / "probs.csv"), "--workers", "0")
    assert out.returncode == 0, out.stderr
    probs = pd.read_csv(tmp_path / "probs.csv")
    c = open_cache(cache)
    assert list(probs.columns) == ["image_id", *c.schema.findings] and len(probs) == len(c.images)
    first = torch.from_numpy(c.load(probs["image_id"].iloc[0])).float().div(255)[None, None]
    expected = torch.sigmoid(model(first))[0].detach().numpy()
    assert np.allclose(probs.iloc[0, 1:].to_numpy(float), expected, atol=1e-5)


def test_killed_mid_epoch_resumes_exactly(cache, tmp_path):
    """Kill a real bf16 run (CPU autocast) during epoch 2; --resume ends with the weights of an
    uninterrupted run, in the precision the run recorded."""
    overrides = tiny("train.epochs=3", "train.batch_size=4", "train.workers=2", "train.amp=bf16")
    train_classifier(load_config(overrides=overrides), cache, tmp_path / "straight", progress=False)
    run = tmp_path / "killed"
    cmd = ["train-classifier", "--data", str(cache), "--out", str(run), *overrides]
    proc = subprocess.Popen([sys.executable, "-m", "cxrcam", *cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "metrics.csv").exists():
        time.sleep(0.02)
    time.sleep(0.3)  # well inside epoch 2
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(pd.read_csv(run / "metrics.csv")) == 1, "the kill should land in epoch 2"
    (run / ".last.pt.x8k2j1.tmp").write_bytes(b"PK half a checkpoint")  # what a kill during a save leaves
    other = cxrcam(*cmd, "--resume", "train.amp=fp32")
    assert other.returncode == 1 and "trained in bf16" in other.stderr and "train.amp=bf16" in other.stderr
    resumed = cxrcam(*cmd, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("classifier: test_resnet on cpu, precision bf16 (train.amp=bf16), resuming at epoch 2")
    assert not list(run.glob(".*.tmp")) and "partly written" in resumed.stderr
    # a log, not a terminal: whole lines, each bar's start and end, no carriage-return redraws
    assert "\r" not in resumed.stderr
    assert sum("classifier epoch 3/3:" in line for line in resumed.stderr.splitlines()) == 2
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(run / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["precision"] == b["precision"] == "bf16"
    assert (pd.read_csv(run / "metrics.csv")["precision"] == "bf16").all()
    for key in a["model"]:
        assert torch.allclose(a["model"][key].float(), b["model"][key].float(), atol=1e-6), key
    straight = pd.read_csv(tmp_path / "straight" / "metrics.csv")
    again = pd.read_csv(run / "metrics.csv")
    cols = ["epoch", "train_loss", "val_loss", "val_mean_auroc"]
    assert np.allclose(straight[cols].to_numpy(), again[cols].to_numpy(), atol=1e-6, equal_nan=True)


def test_torchrun_two_processes_match_single(cache, tmp_path):
    """2 gloo processes under torchrun: the same global batches, so the same weights."""
    n_train = int((open_cache(cache).images["fold"] != 0).sum())
    batch = next(b for b in (8, 10, 12, 14) if (-(-n_train // 2)) // (b // 2) == n_train // b)
    overrides = tiny("model.name=test_efficientnet_gn", f"train.batch_size={batch}", "train.deterministic=true",
                     *NO_AUGMENT)
    train_classifier(load_config(overrides=overrides), cache, tmp_path / "single", progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", "-m", "cxrcam", "train-classifier", "--data", str(cache),
                          "--out", str(tmp_path / "ddp"), *overrides],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    single = torch.load(tmp_path / "single" / "last.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    for key in single["model"]:
        assert torch.allclose(single["model"][key].float(), ddp["model"][key].float(), atol=1e-4), key
    a, b = (pd.read_csv(tmp_path / r / "metrics.csv") for r in ("single", "ddp"))
    assert len(b) == 2  # rank 0 alone wrote
    assert np.allclose(a["train_loss"], b["train_loss"], atol=1e-4)
    assert np.allclose(a["val_loss"], b["val_loss"], atol=1e-4)


def test_user_errors(cache, tmp_path):
    with pytest.raises(CxrcamError, match="val_fold=7"):
        train_classifier(load_config(overrides=tiny("split.val_fold=7")), cache, tmp_path / "r", progress=False)
    with pytest.raises(CxrcamError, match="nothing to resume"):
        train_classifier(load_config(overrides=tiny()), cache, tmp_path / "r", resume=True, progress=False)
    # --resume checks the kind and the architecture of last.pt before touching the weights
    (tmp_path / "r").mkdir()
    save_checkpoint(tmp_path / "r" / "last.pt", {"kind": "detector", "arch": "test_resnet"})
    with pytest.raises(CxrcamError, match="not a cxrcam classifier checkpoint"):
        train_classifier(load_config(overrides=tiny()), cache, tmp_path / "r", resume=True, progress=False)
    save_checkpoint(tmp_path / "r" / "last.pt", {"kind": "classifier", "arch": "resnet50"})
    with pytest.raises(CxrcamError, match="trained a resnet50 classifier; the config asks for test_resnet"):
        train_classifier(load_config(overrides=tiny()), cache, tmp_path / "r", resume=True, progress=False)
    out = cxrcam("train-classifier", "--data", str(tmp_path / "nocache"), "--out", str(tmp_path / "r"))
    assert out.returncode == 2 and "nocache' does not exist" in out.stderr and "Traceback" not in out.stderr


def test_a_folder_holding_a_run_needs_resume_or_overwrite(cache, tmp_path):
    """Training into a used run folder would replace last.pt and could leave the old best.pt
    beside the new run: refused, files untouched; --overwrite starts afresh."""
    old = tmp_path / "old"
    save_checkpoint(old / "best.pt", {"kind": "classifier", "arch": "resnet50", "epoch": 30})
    save_checkpoint(old / "last.pt", {"kind": "classifier", "arch": "resnet50", "epoch": 30})
    before = (old / "best.pt").read_bytes()
    refused = cxrcam("train-classifier", "--data", str(cache), "--out", str(old), *tiny())
    assert refused.returncode == 1 and "holds a run (best.pt, last.pt): pass --resume" in refused.stderr
    assert (old / "best.pt").read_bytes() == before
    train_classifier(load_config(overrides=tiny("train.epochs=1")), cache, old, progress=False, overwrite=True)
    assert torch.load(old / "best.pt", weights_only=True)["arch"] == "test_resnet"


@pytest.mark.slow
def test_synthetic_data_is_learnable(tmp_path):
    """The synthetic promise: a small model from scratch, CPU minutes, high AUROC."""
    # 300 images at 64 px: AUROC 0.82-0.86 over data seeds 2-4 (0.72 with 6 epochs at twice the rate)
    synthesize("vinbig", tmp_path / "data", 300, seed=2, size=96, progress=False)
    prepare("vinbig", tmp_path / "data", tmp_path / "cache", load_config(overrides=["prepare.size=64"]),
            progress=False)
    config = load_config(CONFIGS / "tiny.yaml", ["train.epochs=8", "train.batch_size=16", "train.workers=0",
                                                 "model.output_stride=32"])
    metrics = train_classifier(config, tmp_path / "cache", tmp_path / "run", progress=False)
    assert metrics["val_mean_auroc"] > 0.8
    # the operating points best.pt stores are F1's on its validation fold (60 images), with
    # sensitivity and specificity there in the metrics; boxes.min_prob overrides them
    from cxrcam.train.classifier import predict

    _, ckpt = load_classifier(tmp_path / "run" / "best.pt")
    cache = open_cache(tmp_path / "cache")
    val = cache.images["fold"].to_numpy() == 0
    probs = predict(tmp_path / "run" / "best.pt", tmp_path / "cache", workers=0, progress=False)
    stored = np.asarray(ckpt["op_threshs"], np.float64)
    expected = operating_points(cache.images[target_columns(cache.schema)].to_numpy()[val],
                                probs.iloc[:, 1:].to_numpy(float)[val])
    assert np.allclose(stored, expected, atol=1e-5, equal_nan=True) and np.isfinite(stored).sum() >= 3
    assert 0 < ckpt["metrics"]["val_sensitivity"] <= 1 and 0 < ckpt["metrics"]["val_specificity"] <= 1
    assert np.array_equal(decision_thresholds(ckpt), np.where(np.isnan(stored), 0.5, stored))
    assert (decision_thresholds(ckpt, 0.3) == 0.3).all()


def test_learning_rate_schedules():
    from cxrcam.config import TrainConfig
    from cxrcam.train.classifier import _schedule

    cosine = _schedule(TrainConfig(epochs=10, warmup_epochs=1, scheduler="cosine"), steps_per_epoch=10)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)  # linear warm-up
    assert cosine(10) == pytest.approx(1.0) and cosine(55) == pytest.approx(0.5) and cosine(99) < 0.001
    step = _schedule(TrainConfig(epochs=10, warmup_epochs=0, scheduler="step", step_size=3, gamma=0.1),
                     steps_per_epoch=10)
    assert [step(s) for s in (0, 29, 30, 59, 60)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_sgd_step_run(cache, tmp_path):
    config = load_config(overrides=tiny("train.epochs=1", "train.optimizer=sgd", "train.scheduler=step",
                                        "train.lr=0.01", "model.in_chans=1"))
    metrics = train_classifier(config, cache, tmp_path / "sgd", progress=False)
    assert np.isfinite(metrics["train_loss"])
    # --resume to more epochs than the run was planned for changes its schedule: said, not silent
    longer = cxrcam("train-classifier", "--data", str(cache), "--out", str(tmp_path / "sgd"), "--resume",
                    *tiny("train.epochs=2", "train.optimizer=sgd", "train.scheduler=step", "train.lr=0.01",
                          "model.in_chans=1"))
    assert longer.returncode == 0, longer.stderr
    assert "trained on a 1-epoch schedule and resumes to 2 epochs" in longer.stderr
    state = torch.load(tmp_path / "sgd" / "last.pt", weights_only=True)
    assert "momentum_buffer" in next(iter(state["optimizer"]["state"].values()))
    assert load_classifier(tmp_path / "sgd" / "best.pt")[0].in_chans == 1


def test_best_epoch_is_the_one_saved_as_best():
    nan = float("nan")
    history = [{"epoch": 1, "s": 0.6}, {"epoch": 2, "s": 0.8}, {"epoch": 3, "s": 0.8}, {"epoch": 4, "s": 0.7}]
    assert best_epoch(history, "s")["epoch"] == 2  # the first with the highest score, not the last
    assert best_epoch([{"epoch": 1, "s": nan}, {"epoch": 2, "s": nan}], "s")["epoch"] == 1
    assert best_epoch([{"epoch": 1, "s": nan}, {"epoch": 2, "s": 0.5}], "s")["epoch"] == 2

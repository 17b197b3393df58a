"""Ensembles of classifier checkpoints: predict, localize, refine and calibrate given several."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import cxrcam
from cxrcam.cam import CheckpointMaps, target_weights
from cxrcam.config import load_config
from cxrcam.files import load_checkpoint, save_checkpoint

FAST = ["cam.workers=0", "boxes.min_prob=0.3"]


@pytest.fixture(scope="module")
def members(vinbig_model, tmp_path_factory):
    """(cache, [A, B]): the trained classifier, and a second checkpoint whose head and last stage's
    convolutions differ (a real file, as another training would leave one)."""
    cache, a = vinbig_model
    ckpt = load_checkpoint(a, kind="classifier")
    generator = torch.Generator().manual_seed(0)
    for name, value in ckpt["model"].items():
        if name.startswith(("head.", "backbone.layer4")) and name.endswith("weight") and value.ndim >= 2:
            ckpt["model"][name] = value + 0.3 * value.std() * torch.randn(value.shape, generator=generator)
    ckpt["op_threshs"] = [0.2] * len(ckpt["classes"])
    b = tmp_path_factory.mktemp("member") / "b.pt"
    save_checkpoint(b, ckpt)
    return cache, [a, b]


def test_an_ensembles_maps_and_probabilities_are_its_members_means(members):
    """The mean probability plans the maps; each pair's map is the members' mean map, min-max scaled
    again; an ensemble of one checkpoint with itself is that checkpoint; the decision thresholds
    are the mean of the members' operating points."""
    cache, paths = members
    config = load_config("tiny", [*FAST, "cam.method=layercam", "cam.target_layer=layer3", "boxes.min_prob=auto"])
    single = [CheckpointMaps(p, config) for p in paths]
    both, twice = CheckpointMaps(paths, config), CheckpointMaps([paths[0], paths[0]], config)
    assert both.thresholds == pytest.approx(np.mean([m.thresholds for m in single], axis=0))
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    need = [[0, 3], [], [5]]

    def plan(logits):
        return [target_weights(n, logits.shape[1]) for n in need]

    outs = [m.cam.pairs(x, plan) for m in single]
    joint = both.cam.pairs(x, plan)
    mean_probs = np.mean([torch.sigmoid(o.logits).numpy() for o in outs], axis=0)
    assert torch.sigmoid(joint.logits).numpy() == pytest.approx(mean_probs, abs=1e-6)
    mean = torch.stack([o.maps for o in outs]).mean(0)
    flat = mean.flatten(1)
    expected = (flat - flat.min(1, keepdim=True).values) / (flat.max(1, keepdim=True).values
                                                           - flat.min(1, keepdim=True).values + 1e-7)
    assert torch.allclose(joint.maps.flatten(1), expected, atol=1e-5) and joint.images == [0, 0, 2]
    assert not torch.allclose(outs[0].maps, outs[1].maps, atol=1e-2)  # the members differ
    same = twice.cam.pairs(x, plan)
    assert torch.allclose(same.maps, outs[0].maps, atol=1e-5)


def test_predict_localize_and_calibrate_take_several_checkpoints(members, tmp_path):
    """predict writes the mean probability; calibrate chooses the ensemble's operating points on its
    mean validation probabilities and records them; localize with that calibration predicts by them
    and says which checkpoints it used."""
    cache, (a, b) = members
    tables = []
    for name, args in (("a", [a]), ("b", [b]), ("ab", [a, b])):
        out = tmp_path / f"{name}.csv"
        result = cxrcam("predict", *[x for p in args for x in ("--checkpoint", str(p))], "--data", str(cache),
                        "--out", str(out), "--workers", "0")
        assert result.returncode == 0, result.stderr
        tables.append(pd.read_csv(out, dtype={"image_id": str}).set_index("image_id"))
    assert tables[2].to_numpy() == pytest.approx((tables[0].to_numpy() + tables[1].to_numpy()) / 2, abs=1e-6)

    cal = tmp_path / "cal.json"
    result = cxrcam("calibrate", "--checkpoint", str(a), "--checkpoint", str(b), "--data", str(cache), "--out", str(cal),
                    "--maps", "none", "cam.workers=0")
    assert result.returncode == 0, result.stderr
    saved = json.loads(cal.read_text())
    assert saved["checkpoint"] == [str(a), str(b)] and len(saved["operating_points"]) == 14
    chosen = [v for v in saved["operating_points"] if v is not None]
    assert chosen and all(0 < v < 1 for v in chosen)
    loc = tmp_path / "loc"
    result = cxrcam("localize", "--checkpoint", str(a), "--checkpoint", str(b), "--data", str(cache), "--out", str(loc),
                    "--threshold", str(cal), "--no-images", "cam.workers=0")
    assert result.returncode == 0, result.stderr
    settings = json.loads((loc / "localize.json").read_text())
    assert settings["checkpoint"] == [str(a), str(b)]
    mean_own = np.mean([CheckpointMaps(p, load_config("tiny", ["cam.workers=0"])).thresholds for p in (a, b)], axis=0)
    expected = [m if v is None else v for v, m in zip(saved["operating_points"], mean_own)]
    assert settings["decision_thresholds"] == pytest.approx(expected)
    probs = pd.read_csv(loc / "probabilities.csv", dtype={"image_id": str}).set_index("image_id")
    assert probs.loc[tables[2].index].to_numpy() == pytest.approx(tables[2].to_numpy(), abs=1e-5)


def test_an_ensemble_of_different_models_is_refused(members, nih_model, tmp_path):
    cache, (a, _) = members
    result = cxrcam("localize", "--checkpoint", str(a), "--checkpoint", str(nih_model[1]), "--data", str(cache),
                    "--out", str(tmp_path / "x"), "--no-images", "cam.workers=0")
    assert result.returncode != 0 and "must share classes and input size" in result.stderr
    assert "Traceback" not in result.stderr

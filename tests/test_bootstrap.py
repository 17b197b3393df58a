"""`cxrcam evaluate --ci` and paired comparisons: the re-weighted bootstrap against a direct loop over
resampled images, a simulated difference its interval covers, and identical submissions."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from conftest import cxrcam
from cxrcam.config import load_config
from cxrcam.data.tables import BOX_COLUMNS, target_columns
from cxrcam.evaluation.bootstrap import Inputs, bootstrap, figures, weighted_auroc, weights
from cxrcam.evaluation.classification import auroc_per_class
from cxrcam.evaluation.detection import voc_map
from cxrcam.evaluation.evaluate import bootstrap_inputs, findings_map, score
from cxrcam.evaluation.weak import accuracy_table, maxboxacc_table
from cxrcam.schemas import VINBIG


@pytest.fixture(scope="module")
def localized(vinbig_model, tmp_path_factory):
    """A localize folder of the test model on its own cache (submission, probabilities, peaks, curves)."""
    from cxrcam.localize import localize

    cache, ckpt = vinbig_model
    out = tmp_path_factory.mktemp("boot") / "loc"
    localize(ckpt, cache, out, load_config(overrides=["cam.workers=0", "boxes.min_prob=0.05"]), pictures=False,
             progress=False)
    return cache, out


def _repeat(table: pd.DataFrame, counts: dict[str, int], column: str = "image_id") -> pd.DataFrame:
    """Each image's rows as many times as it was drawn, each copy a new image id."""
    parts = [table[table[column] == i].assign(**{column: f"{i}#{k}"}) for i, n in counts.items() for k in range(n)]
    return pd.concat(parts, ignore_index=True) if parts else table.iloc[:0]


def test_the_bootstrap_is_the_plain_evaluator_on_each_resample(localized):
    """For each resample: duplicate the drawn images' truth, detections, probabilities, peaks and
    curves under new ids and run the plain metrics on them; the re-weighted figures agree."""
    cache, folder = localized
    scored = score(folder, cache)
    x = bootstrap_inputs(scored)
    truth, ids = scored.truth, scored.truth.image_ids
    w = weights(len(ids), 3, seed=5)
    drawn = figures(x, w)
    curves = pd.read_csv(folder / "box_curves.csv", dtype={"image_id": str})
    points = truth.boxes.assign(pointing=scored.points.to_numpy(float))
    for b in range(len(w)):
        counts = {i: int(n) for i, n in zip(ids, w[b]) if n}
        voc = _repeat(scored.voc_truth, counts)
        dets = _repeat(scored.detections, counts)
        mean_ap, per_class = voc_map(voc, dets, 0.4)
        assert drawn["mAP@0.4"][b] == pytest.approx(mean_ap, abs=1e-12)
        ap = {VINBIG.class_name(r.class_id): r.ap if r.n_truth else None for r in per_class}  # as metrics.json
        assert drawn["findings mAP@0.4"][b] == pytest.approx(findings_map(ap), abs=1e-12)
        for r in per_class:
            if r.n_truth:
                assert drawn[f"AP {VINBIG.class_name(r.class_id)}"][b] == pytest.approx(r.ap, abs=1e-12)
        labels = _repeat(truth.labels, counts).sort_values("image_id")
        probs = _repeat(scored.probs, counts).sort_values("image_id")
        per = auroc_per_class(labels[target_columns(VINBIG)].to_numpy(), probs[list(VINBIG.findings)].to_numpy())
        assert drawn["mean AUROC"][b] == pytest.approx(np.nanmean(per), abs=1e-12)
        boxes = _repeat(points, counts)
        table = accuracy_table(boxes[["image_id", "class_id", *BOX_COLUMNS]], dets, VINBIG, boxes["pointing"])
        row = table[table["class"] == "all"].iloc[0]
        for key, column in (("T(IoU)=0.5", "iou@0.5"), ("T(IoBB)=0.5", "iobb@0.5"), ("pointing game", "pointing")):
            assert drawn[key][b] == pytest.approx(row[column], abs=1e-12), key
        wsol = maxboxacc_table(_repeat(curves, counts), VINBIG)
        assert drawn["MaxBoxAccV2"][b] == pytest.approx(wsol[wsol["class"] == "all"]["maxboxacc_v2"].iloc[0], abs=1e-12)
    point = figures(x, np.ones((1, len(ids))))  # no resampling: the plain evaluator's figures
    assert point["mAP@0.4"][0] == pytest.approx(scored.metrics["map"], abs=1e-12)
    assert point["mean AUROC"][0] == pytest.approx(scored.metrics["mean_auroc"], abs=1e-12)


def test_weighted_auroc_is_scikit_learns_with_repeats():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = (rng.random(50) < 0.3).astype(float)
    probs = np.round(rng.random(50), 1)  # ties
    w = weights(50, 5, seed=2)
    ours = weighted_auroc(labels, probs, w)
    for b in range(5):
        expected = roc_auc_score(np.repeat(labels, w[b].astype(int)), np.repeat(probs, w[b].astype(int)))
        assert ours[b] == pytest.approx(expected, abs=1e-12)


def test_the_interval_covers_a_known_difference():
    """Two classifiers of known population AUROC (normal scores: Phi(d / sqrt 2)) scored on the same
    images: over 50 simulated test sets the paired 95% interval of their difference covers the true
    difference about 95% of the time, and on each it excludes 0 (a real difference of 0.13)."""
    truth = norm.cdf(1.6 / np.sqrt(2)) - norm.cdf(0.8 / np.sqrt(2))
    covered, significant = 0, 0
    for seed in range(50):
        rng = np.random.default_rng(seed)
        n = 400
        labels = (rng.random((n, 1)) < 0.3).astype(float)
        noise = rng.normal(size=(n, 2))
        inputs = [Inputs({}, [], {}, labels=labels, probs=labels * d + noise[:, [k]]) for k, d in enumerate((0.8, 1.6))]
        diff = bootstrap(inputs, n, 300, seed=seed)["pairs"][0]["figures"]["mean AUROC"]
        covered += diff["ci"][0] < truth < diff["ci"][1]
        significant += diff["p"] < 0.05
    assert covered >= 43 and significant >= 45  # binomial(50, 0.95): 43 is 2.3 sd below 47.5


def test_ci_and_comparison_from_the_command_line(localized, tmp_path):
    """`--ci` adds an interval around every headline figure; two --pred of one submission differ by
    nothing (p = 1); comparison.json, .md and .png are written."""
    cache, folder = localized
    result = cxrcam("evaluate", "--pred", str(folder), "--gt", str(cache), "--ci", "--bootstrap", "200",
                    "--json", str(tmp_path / "m.json"), "--no-control")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["bootstrap"]["resamples"] == 200 and "95% percentile intervals" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]  # --json alone writes only it
    for key, value in (("mAP@0.4", metrics["map"]), ("mean AUROC", metrics["mean_auroc"])):
        lo, hi = metrics["ci"][key]
        assert lo <= value <= hi and lo < hi
    same = cxrcam("evaluate", "--pred", str(folder), "--pred", str(folder / "submission.csv"), "--gt", str(cache),
                  "--bootstrap", "100", "--out", str(tmp_path / "cmp"))
    assert same.returncode == 0, same.stderr
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    (pair,) = comparison["pairs"]
    assert pair["figures"]["mAP@0.4"]["p"] == 1.0 and pair["figures"]["mAP@0.4"]["difference"] == 0
    assert "Paired differences" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 10_000

"""`cxrcam report`: the page renders in headless Chromium without errors, shows the gallery,
and its class / outcome filters pick the right cards."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import partial

import pandas as pd
import pytest

from conftest import cxrcam as run_cxrcam
from cxrcam.errors import CxrcamError
from cxrcam.outputs.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


cxrcam = partial(run_cxrcam, timeout=900)


@pytest.fixture(scope="module")
def run_dir(vinbig_model, tmp_path_factory):
    """A folder as the demo leaves it: the cache, the classifier run, a localize folder with
    pictures, and its evaluation."""
    cache, ckpt = vinbig_model
    root = tmp_path_factory.mktemp("report")
    loc = cxrcam("localize", "--checkpoint", str(ckpt), "--data", str(cache), "--out", str(root / "localize"),
                 "boxes.min_prob=0.2", "cam.workers=0")
    assert loc.returncode == 0, loc.stderr[-3000:]
    ev = cxrcam("evaluate", "--pred", str(root / "localize"), "--gt", str(cache), "--no-control",
                "--out", str(root / "localize" / "eval"))
    assert ev.returncode == 0, ev.stderr[-3000:]
    shutil.copytree(cache, root / "cache")
    shutil.copytree(ckpt.parent, root / "classifier")
    return root


def render(page, fragment: str = "") -> str:
    """The page's DOM after its scripts ran, from headless Chromium."""
    if CHROMIUM is None:
        pytest.skip("chromium not installed (Debian package `chromium`; .ci/run installs it)")
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", page.resolve().as_uri() + fragment], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def cards(dom: str) -> list[tuple[str, str, bool]]:
    """(data-hit, data-miss, hidden) of each gallery card."""
    found = re.findall(r'<figure class="card" data-truth="[^"]*" data-hit="([^"]*)" data-miss="([^"]*)" '
                       r'data-pred="[^"]*"( hidden(?:="")?)?>', dom)
    return [(hit, miss, bool(hidden)) for hit, miss, hidden in found]


def test_report_renders_with_gallery_and_filters(run_dir, tmp_path):
    page = write_report(run_dir, tmp_path / "site" / "report.html")
    dom = render(page)
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-loaded="1"' in body and 'data-errors="0"' in body  # scripts ran, no script error
    assert 'data-broken="0"' in body  # every picture and plot loaded, the gallery's through relative links
    for heading in ("Dataset overview", "Training", "Per-class metrics", "Gallery"):
        assert f"<h2>{heading}</h2>" in dom
    # results first: the summary, then per-class metrics, the gallery; the overview collapsed at the end
    order = re.findall(r'<section id="([^"]+)"', dom)
    assert order == ["summary", "per-class-metrics", "gallery", "training", "dataset-overview"]
    assert re.search(r'<section id="dataset-overview"><details>', dom)  # collapsed (no "open")
    summary = dom[dom.index('id="summary"'):dom.index('id="per-class-metrics"')]
    metrics = json.loads((run_dir / "localize" / "eval" / "metrics.json").read_text())
    assert f"<td>{metrics['map']:.3f}</td>" in summary  # the headline mAP
    assert re.search(r"MaxBoxAccV2.*\(\d\.\d{3}\)", summary, re.S)  # beside its random-map control
    assert '<a href="../../' in summary and "submission.csv</a>" in summary  # where the submission is
    # rows are named by what they are, under one sentence on the CAM boxes against their control
    assert "<td>CAM-only, threshold 0.65 <small>(localize/eval)</small></td>" in summary
    assert re.search(r'<p class="verdict">CAM-only, threshold 0.65: the CAM boxes (beat|do not beat) their '
                     r'random-map control, MaxBoxAccV2 \d\.\d{3} against \d\.\d{3}', summary)
    shown = cards(dom)
    bb = pd.read_csv(run_dir / "localize" / "bb_results.csv")
    assert len(shown) == 160  # every image has pictures
    assert not any(hidden for *_, hidden in shown)
    assert re.search(r'class="shown">(\d+) shown<', dom).group(1) == str(len(shown))

    # the address fragment sets the filters: only cards with a hit of that class stay visible
    truth = bb[bb["gt_x_min"].notna()]
    hit_class = int(truth.loc[truth["hit"].astype(bool), "class_id"].mode().iloc[0]) if truth["hit"].any() \
        else int(truth["class_id"].iloc[0])
    outcome = "hit" if truth["hit"].any() else "miss"
    dom = render(page, f"#class={hit_class}&outcome={outcome}")
    filtered = cards(dom)
    expected = truth[truth["hit"].astype(bool) == (outcome == "hit")]
    expected = expected.loc[expected["class_id"] == hit_class, "image_id"].nunique()
    visible = [c for c in filtered if not c[2]]
    assert len(visible) == expected > 0
    index = 0 if outcome == "hit" else 1
    assert all(str(hit_class) in c[index].split() for c in visible)
    assert re.search(r'class="shown">(\d+) shown<', dom).group(1) == str(expected)


def test_report_links_do_not_depend_on_where_evaluate_ran(run_dir, tmp_path, monkeypatch):
    """evaluate run from inside the run folder with relative paths, the report written from
    elsewhere: its link still reaches the submission (metrics.json keeps absolute paths)."""
    monkeypatch.chdir(run_dir)
    ev = cxrcam("evaluate", "--pred", "localize", "--gt", "cache", "--no-control", "--out", "relative_eval")
    assert ev.returncode == 0, ev.stderr[-2000:]
    monkeypatch.chdir(tmp_path)
    page = write_report(run_dir, tmp_path / "elsewhere" / "r.html")
    links = re.findall(r'<a href="([^"]+)">submission.csv</a>', page.read_text())
    assert links and all((page.parent / link).resolve() == run_dir / "localize" / "submission.csv" for link in links)
    shutil.rmtree(run_dir / "relative_eval")


def test_report_command_and_errors(run_dir, tmp_path):
    result = cxrcam("report", "--run", str(run_dir), "--out", str(tmp_path / "r.html"), "--embed", "--max-pictures", "5")
    assert result.returncode == 0, result.stderr[-2000:]
    text = (tmp_path / "r.html").read_text()
    assert text.count('<figure class="card"') == 5 and 'src="data:image/png;base64,' in text
    # a capped gallery says so, and shows images with truth boxes first
    assert "The first 5 of 160 images, those with truth boxes first" in text
    assert "no truth boxes</figcaption>" not in text
    assert "The first" not in write_report(run_dir, tmp_path / "all.html").read_text()  # 160 <= 300: all shown
    assert "gtimage_" not in text  # embedded, not linked
    assert '<option value="3">Cardiomegaly</option>' in text  # the class filter names the VinBigData findings
    (tmp_path / "empty").mkdir()
    with pytest.raises(CxrcamError, match="nothing to report"):
        write_report(tmp_path / "empty", tmp_path / "x.html")
    missing = cxrcam("report", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x.html"))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr

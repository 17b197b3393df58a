"""``cxrcam report``: one HTML page of everything under a run folder, for a browser.

It finds, anywhere under the folder, and shows in this order, results first:
``evaluate`` outputs (``metrics.json``) -> a summary (each submission's headline figures beside
the random-map control, and a link to it), then per-class metrics and PR curves; ``localize`` /
``refine`` folders (``localize.json``) -> a gallery of the ``gtimage_`` and ``pred_`` pictures,
filtered in the page by class and by hit / miss (``bb_results.csv``); training runs
(``metrics.csv`` next to ``last.pt``) -> curves; ``prepare`` caches (``cache.json``) -> a dataset
overview (findings per class, box size per class, where each finding lies over the mean chest).
The last two are collapsed. A ``#class=<id>&outcome=hit|miss`` address fragment sets the
gallery's filters, so a filtered view can be shared.

Plots are matplotlib PNGs embedded in the page; the gallery's pictures are linked relative to
the page (``embed=True`` inlines them too, for a single file to mail).
"""
from __future__ import annotations

import base64
import html
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from cxrcam.errors import CxrcamError
from cxrcam.files import atomic_write_text, figure_png
from cxrcam.outputs.pictures import picture_paths
from cxrcam.data.tables import target_columns
from cxrcam.schemas import SCHEMAS, VINBIG, Schema


def write_report(run: str | Path, out: str | Path, embed: bool = False, max_pictures: int = 300) -> Path:
    """Write the report of everything under ``run`` to ``out`` (an .html file)."""
    run, out = Path(run), Path(out)
    if not run.is_dir():
        raise CxrcamError(f"run folder not found: {run}")
    caches = sorted(p.parent for p in run.rglob("cache.json"))
    runs = sorted(p.parent for p in run.rglob("metrics.csv") if (p.parent / "last.pt").is_file())
    evals = _evaluations(run)
    predictions = sorted(p.parent for p in run.rglob("localize.json"))
    if not (caches or runs or evals or predictions):
        raise CxrcamError(f"nothing to report under {run}: no cache, training run, evaluate or localize output")
    comparisons = sorted(run.rglob("comparison.json"))
    sections = [_section("Summary", [_summary(evals, run, out.parent), *(_comparison(c) for c in comparisons)]),
                _section("Per-class metrics", [_evaluation(e, run) for e in evals]),
                _section("Gallery", [_gallery(p, run, out.parent, embed, max_pictures) for p in predictions]),
                _section("Training", [_training(r, run) for r in runs], collapsed=True),
                _section("Dataset overview", [_dataset(c, run) for c in caches[:3]], collapsed=True)]
    page = PAGE.format(title=html.escape(f"cxrcam report: {run.resolve().name}"), body="\n".join(s for s in sections if s))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    return out


def _evaluations(run: Path) -> list[Path]:
    """The ``evaluate`` outputs (metrics.json) under ``run``; one that cannot be read, or whose figures
    are not numbers (a hand-edited file), is named in a warning and left out."""
    found = []
    for path in sorted(run.rglob("metrics.json")):
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            warnings.warn(f"{path}: not readable as JSON ({exc}): left out of the report", stacklevel=2)
            continue
        if not isinstance(m, dict):
            warnings.warn(f"{path}: holds a {type(m).__name__}, not evaluate's metrics: left out of the report",
                          stacklevel=2)
            continue
        if not {"map", "auroc"} & m.keys():
            continue  # another tool's metrics.json
        problem = _malformed(m)
        if problem:
            warnings.warn(f"{path}: {problem}: left out of the report", stacklevel=2)
            continue
        found.append(path)
    return found


def _malformed(m: dict) -> str | None:
    """What in an evaluate metrics.json is not of the form evaluate writes (None: nothing)."""
    def number(v) -> bool:
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))

    for key in ("map", "mean_auroc", "control_map", "iou_thr"):
        if key in m and not number(m[key]):
            return f'"{key}" is {m[key]!r}, not a number'
    for key in ("ap", "auroc", "n_truth", "control_ap"):
        if key in m and not (isinstance(m[key], dict) and all(map(number, m[key].values()))):
            return f'"{key}" is not a table of numbers by class'
    if "ci" in m and not (isinstance(m["ci"], dict) and all(
            isinstance(v, list) and len(v) == 2 and all(map(number, v)) for v in m["ci"].values())):
        return '"ci" is not a table of [low, high] intervals'
    for key in ("localization", "maxboxacc"):
        rows = m.get(key, [])
        if not (isinstance(rows, list) and all(isinstance(r, dict) and {"source", "class"} <= r.keys() and all(
                number(v) for k, v in r.items() if k not in ("source", "class")) for r in rows)):
            return f'"{key}" is not a list of rows of numbers'
    return None


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _section(title: str, parts: list[str], collapsed: bool = False) -> str:
    """A titled section; ``collapsed`` ones open on a click (what a reader needs first stays on top)."""
    parts = [p for p in parts if p]
    if not parts:
        return ""
    slug = title.lower().replace(" ", "-")
    if collapsed:
        return (f'<section id="{slug}"><details><summary><h2>{title}</h2></summary>{"".join(parts)}'
                f"</details></section>")
    return f'<section id="{slug}"><h2>{title}</h2>{"".join(parts)}</section>'


def verdict(label: str, figures: dict, ci: dict | None = None) -> str | None:
    """One sentence: whether a submission's CAM boxes beat their random-map control (MaxBoxAccV2,
    else T(IoBB)=0.5), and, given the figure's bootstrap interval, whether beyond noise; None where
    no control was measured."""
    for name in ("MaxBoxAccV2", "T(IoBB)=0.5"):
        model, control = figures.get(name, (None, None))
        if model is not None and control is not None:
            ratio = f" ({model / control:.1f}x)" if control > 0 else ""
            beat = "beat" if model > control else "do not beat"
            interval = (ci or {}).get(name)
            noise = ""
            if interval and interval[0] is not None:
                clear = interval[0] > control if model > control else interval[1] < control
                noise = (f"; its 95% interval [{interval[0]:.3f}, {interval[1]:.3f}] "
                         f"{'clears' if clear else 'holds'} the control: {'beyond' if clear else 'within'} noise")
            return (f"{label}: the CAM boxes {beat} their random-map control, {name} {model:.3f} against "
                    f"{control:.3f}{ratio}{noise}.")
    return None


def _summary(evals: list[Path], run: Path, page_dir: Path) -> str:
    """One row per evaluated submission, named by what it is: its headline figures beside the
    random-map control, and a link to the submission itself; above them, a sentence per CAM-box
    submission on whether it beats that control."""
    from cxrcam.evaluation.evaluate import headline

    rows, labels, verdicts = [], [], []
    for path in evals:
        m = _json(path)
        figures = headline(m) if "ap" in m else {}
        labels = labels or list(figures)
        name = m.get("submission_label") or str(path.parent.relative_to(run))
        if m.get("cam_boxes") and verdict(name, figures):
            verdicts.append(verdict(name, figures, m.get("ci")))
        submission = Path(m.get("submission", ""))
        link = (f'<a href="{html.escape(_src(submission, page_dir, False))}">{html.escape(submission.name)}</a>'
                if submission.is_file() else "-")
        ci = m.get("ci", {})
        cells = "".join(f"<td>{_pair(*figures.get(k, (None, None)), ci.get(k))}</td>" for k in labels)
        where = html.escape(str(path.parent.relative_to(run)))
        rows.append(f"<tr><td>{html.escape(name)} <small>({where})</small></td>"
                    f"<td>{_pair(m.get('map'), None, ci.get('mAP@0.4'))}</td>{cells}"
                    f"<td>{_pair(m.get('mean_auroc'), None, ci.get('mean AUROC'))}</td><td>{link}</td></tr>")
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in labels)
    said = "".join(f'<p class="verdict">{html.escape(v)}</p>' for v in verdicts)
    return (f"{said}<p>Each evaluated submission on its ground truth. Under a figure, in grey: its 95% bootstrap "
            "interval (evaluate --ci). In brackets: the same figure for random heat maps (the control a localisation "
            "method must beat); - where not measured (MaxBoxAccV2 and the pointing game describe a classifier's "
            "maps, so a detector's submission has none).</p>"
            f"<table><tr><th>submission</th><th>mAP@0.4</th>{head}<th>mean AUROC</th><th>file</th></tr>"
            f"{''.join(rows)}</table>")


def _comparison(path: Path) -> str:
    """A paired comparison (evaluate with several --pred) in sentences: each pair's findings mAP
    difference with its interval and p-value, and whether that is beyond noise."""
    from cxrcam.evaluation.compare import pair_sentence

    c = _json(path)
    lines = []
    for pair in c.get("pairs", []):
        figure = "findings mAP@0.4" if pair["figures"].get("findings mAP@0.4") else "mAP@0.4"
        f = pair["figures"].get(figure)
        if not f or f.get("difference") is None or f["ci"][0] is None:
            continue
        lines.append(pair_sentence(pair["a"], pair["b"], f, figure) + ".")
    return "".join(f'<p class="verdict">{html.escape(line)}</p>' for line in lines)


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _pair(model, control, ci=None) -> str:
    """A figure, its random-map control in brackets, its interval below it."""
    text = _num(model) + (f" <small>({_num(control)})</small>" if control is not None else "")
    if ci and model is not None and ci[0] is not None:
        text += f'<br><small class="ci">[{ci[0]:.3f}, {ci[1]:.3f}]</small>'
    return text


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _figure(fig) -> str:
    """A matplotlib figure as an embedded <img>."""
    return f'<img class="plot" src="{_data_uri(figure_png(fig, dpi=90, bbox_inches="tight"))}">'


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _dataset(cache_dir: Path, run: Path) -> str:
    """Findings per class, box size (share of the image) per class, and where each finding lies."""
    import cv2

    from cxrcam.data.cache import CACHE_BOX_COLUMNS, open_cache

    cache = open_cache(cache_dir)
    schema, size, plt = cache.schema, cache.size, _pyplot()
    names = list(schema.findings)
    labels = cache.images[target_columns(schema)].to_numpy() >= 0.5
    boxes = cache.boxes
    n_boxes = np.bincount(boxes["class_id"], minlength=len(names)) if len(boxes) else np.zeros(len(names), int)
    colours = [np.array(schema.colour(i)) / 255 for i in range(len(names))]

    fig, ax = plt.subplots(figsize=(8, 0.3 * len(names) + 1))
    y = np.arange(len(names))
    ax.barh(y - 0.2, labels.sum(0), 0.4, color=colours, label="images")
    ax.barh(y + 0.2, n_boxes, 0.4, color=colours, alpha=0.45, label="boxes")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.legend()
    ax.set_title(f"findings per class ({len(cache.images)} images, {int((~labels.any(1)).sum())} without findings)")
    parts = [_figure(fig)]

    if len(boxes):
        c = boxes[CACHE_BOX_COLUMNS].to_numpy() / size
        share = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])
        present = [k for k in range(len(names)) if n_boxes[k]]
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(present) + 1))
        ax.boxplot([share[boxes["class_id"].to_numpy() == k] for k in present], orientation="horizontal")
        ax.set_yticks(np.arange(1, len(present) + 1), [names[k] for k in present])
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set(xlabel="box area / image area", title="box size per class")
        parts.append(_figure(fig))

        grid = 48
        mean = np.zeros((grid, grid))
        files = cache.images["file"].to_numpy()[:: max(1, len(cache.images) // 100)]
        for f in files:
            image = cv2.imread(str(cache.root / f), cv2.IMREAD_GRAYSCALE)
            if image is not None:
                mean += cv2.resize(image, (grid, grid), interpolation=cv2.INTER_AREA) / 255 / len(files)
        cols = 5
        rows = -(-len(present) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, k in zip(axes.flat, present):
            heat = np.zeros((grid, grid))
            for x0, y0, x1, y1 in np.clip(c[boxes["class_id"].to_numpy() == k] * grid, 0, grid):
                heat[int(y0):max(int(y0) + 1, int(np.ceil(y1))), int(x0):max(int(x0) + 1, int(np.ceil(x1)))] += 1
            ax.imshow(mean, cmap="gray", vmin=0, vmax=1)
            ax.imshow(np.ma.masked_equal(heat, 0), cmap="jet", alpha=0.6)
            ax.set_title(f"{names[k]} ({n_boxes[k]})", fontsize=8)
        fig.suptitle("where each finding lies (box coverage over the mean image)")
        parts.append(_figure(fig))
    return f"<h3>{html.escape(str(cache_dir.relative_to(run)))}</h3>" + "".join(parts)


def _training(run_dir: Path, run: Path) -> str:
    """Loss curves and the validation metric of a classifier or detector run."""
    metrics = pd.read_csv(run_dir / "metrics.csv")
    if metrics.empty:
        return ""
    plt = _pyplot()
    losses = [c for c in metrics.columns if "loss" in c]
    score = next((c for c in ("val_mean_auroc", "val_map") if c in metrics.columns), None)
    fig, axes = plt.subplots(1, 2 if score else 1, figsize=(10 if score else 5, 3.2), squeeze=False)
    for c in losses:
        axes[0, 0].plot(metrics["epoch"], metrics[c], marker="o", ms=3, label=c)
    axes[0, 0].set(xlabel="epoch", title="loss")
    axes[0, 0].legend(fontsize=7)
    if score:  # both scores lie in [0, 1]: a fixed axis, not one zoomed onto noise near 0
        axes[0, 1].plot(metrics["epoch"], metrics[score], marker="o", ms=3, color="C3")
        axes[0, 1].set(xlabel="epoch", title=score.replace("val_", "validation "), ylim=(0, 1.02))
    kind = "detector" if "val_map" in metrics.columns else "classifier"
    return f"<h3>{html.escape(str(run_dir.relative_to(run)))} ({kind})</h3>" + _figure(fig)


def _evaluation(path: Path, run: Path) -> str:
    """The metrics table of one ``evaluate`` output, with its PR curve and AP plots."""
    m = _json(path)
    ap, auroc, n_truth = m.get("ap", {}), m.get("auroc", {}), m.get("n_truth", {})
    head = []
    if m.get("map") is not None:
        head.append(f"mAP@{m.get('iou_thr', 0.4)} <b>{m['map']:.3f}</b>")
    if m.get("mean_auroc") is not None:
        head.append(f"mean AUROC <b>{m['mean_auroc']:.3f}</b>")

    rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{n_truth.get(c, '-')}</td><td>{_num(ap.get(c))}</td>"
                   f"<td>{_num(auroc.get(c))}</td></tr>" for c in dict.fromkeys([*ap, *auroc]))
    plots = "".join(f'<img class="plot" src="{_data_uri((path.parent / f).read_bytes())}">'
                    for f in ("ap_per_class.png", "pr_curves.png") if (path.parent / f).is_file())
    return (f"<h3>{html.escape(str(path.parent.relative_to(run)))}</h3><p>{' &middot; '.join(head)}</p>"
            f"<table><tr><th>class</th><th>truth boxes</th><th>AP</th><th>AUROC</th></tr>{rows}</table>{plots}")


def _gallery(folder: Path, run: Path, page_dir: Path, embed: bool, max_pictures: int) -> str:
    """Cards of gtimage_/pred_ pictures tagged with their truth, hit, missed and predicted classes."""
    settings = _json(folder / "localize.json")
    schema = _schema_of(folder)
    bb = pd.read_csv(folder / "bb_results.csv", dtype={"image_id": str}) if (folder / "bb_results.csv").is_file() \
        else pd.DataFrame(columns=["image_id", "class_id", "gt_x_min", "pred_x_min", "hit"])
    probs = pd.read_csv(folder / "probabilities.csv", dtype={"image_id": str}) \
        if (folder / "probabilities.csv").is_file() else pd.DataFrame(columns=["image_id"])
    ids = list(dict.fromkeys([*bb["image_id"], *probs["image_id"]]))
    truth = bb[bb["gt_x_min"].notna()]
    with_truth = set(truth["image_id"])
    total = len(ids)
    ids = sorted(ids, key=lambda i: i not in with_truth)[:max_pictures]  # images with truth first
    groups = {k: g for k, g in bb.groupby("image_id")}
    cards = []
    for image_id in ids:
        paths = picture_paths(folder, image_id)
        if not paths["gtimage"].is_file():
            continue
        g = groups.get(image_id, bb.iloc[:0])
        t = g[g["gt_x_min"].notna()]
        hit = sorted(set(t.loc[t["hit"].astype(bool), "class_id"].astype(int)))
        miss = sorted(set(t.loc[~t["hit"].astype(bool), "class_id"].astype(int)))
        pred = sorted(set(g.loc[g["pred_x_min"].notna(), "class_id"].astype(int)))
        caption = ", ".join([*(f"&#10003; {schema.class_name(c)}" for c in hit),
                             *(f"&#10007; {schema.class_name(c)}" for c in miss)]) or "no truth boxes"
        imgs = "".join(_thumbnail(paths[kind], kind, page_dir, embed) for kind in ("gtimage", "pred")
                       if paths[kind].is_file())  # no link to a picture that is not there
        cards.append(f'<figure class="card" data-truth="{" ".join(map(str, sorted({*hit, *miss})))}" '
                     f'data-hit="{" ".join(map(str, hit))}" data-miss="{" ".join(map(str, miss))}" '
                     f'data-pred="{" ".join(map(str, pred))}">{imgs}<figcaption><code>{html.escape(image_id)}'
                     f"</code><br>{caption}</figcaption></figure>")
    if not cards:
        return ""
    options = "".join(f'<option value="{i}">{html.escape(n)}</option>' for i, n in enumerate(schema.findings))
    title = folder.relative_to(run)
    kind = "refined: yellow truth, refined boxes; pred_: heat map + CAM boxes" if settings.get("detector") \
        else "CAM: yellow truth, predicted boxes; pred_: heat map"
    shown = (f'<p>The first {len(cards)} of {total} images, those with truth boxes first '
             f'(<code>cxrcam report --max-pictures</code>); every picture is in {html.escape(str(title))}/.</p>'
             if total > len(ids) else "")
    return (f'<div class="gallery"><h3>{html.escape(str(title))} <small>({kind})</small></h3>{shown}'
            f'<div class="filters">class <select class="cls"><option value="">all</option>{options}</select> '
            f'outcome <select class="outcome"><option value="">all</option><option value="hit">hit (IoU &gt; '
            f'threshold)</option><option value="miss">missed truth box</option><option value="pred">predicted'
            f'</option></select> <span class="shown"></span></div><div class="cards">{"".join(cards)}</div></div>')


def _thumbnail(path: Path, kind: str, page_dir: Path, embed: bool) -> str:
    """A gallery picture; linked pictures open full size on a click."""
    src = _src(path, page_dir, embed)
    image = f'<img alt="{kind}" src="{src}">'
    return image if embed else f'<a href="{src}">{image}</a>'


def _schema_of(folder: Path) -> Schema:
    """The dataset schema whose findings head localize's probabilities.csv (no checkpoint to load)."""
    path = folder / "probabilities.csv"
    header = list(pd.read_csv(path, nrows=0).columns[1:]) if path.is_file() else []
    return next((s for s in SCHEMAS.values() if list(s.findings) == header), VINBIG)


def _src(path: Path, page_dir: Path, embed: bool) -> str:
    if embed:
        return _data_uri(path.read_bytes())
    return Path(os.path.relpath(path.resolve(), page_dir.resolve())).as_posix()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
h2 {{ border-bottom: 2px solid #ddd; padding-bottom: .2em; }}
img.plot {{ max-width: 100%; display: block; margin: .5em 0; }}
table {{ border-collapse: collapse; margin: .5em 0; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
td:first-child {{ text-align: left; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 8px; }}
.card {{ margin: 0; border: 1px solid #ccc; padding: 4px; width: 520px; }}
.card img {{ width: 256px; }}
summary h2 {{ display: inline; }} summary {{ cursor: pointer; margin: 1em 0; }}
.card[hidden] {{ display: none; }}
figcaption {{ font-size: 12px; }}
.filters {{ margin: .5em 0; }}
p.verdict {{ font-size: 1.1em; font-weight: 600; margin: .4em 0; }}
small.ci {{ color: #777; }}
</style></head>
<body data-errors="0">
<h1>{title}</h1>
{body}
<script>
window.addEventListener("error", () => {{ document.body.dataset.errors = +document.body.dataset.errors + 1; }});
function words(card, key) {{ return (card.dataset[key] || "").split(" ").filter(Boolean); }}
function applyFilters(gallery) {{
  const cls = gallery.querySelector(".cls").value, outcome = gallery.querySelector(".outcome").value;
  let shown = 0;
  for (const card of gallery.querySelectorAll(".card")) {{
    const pool = outcome ? words(card, outcome) : [...words(card, "truth"), ...words(card, "pred")];
    const ok = cls ? pool.includes(cls) : (outcome ? pool.length > 0 : true);
    card.hidden = !ok;
    shown += ok;
  }}
  gallery.querySelector(".shown").textContent = shown + " shown";
}}
const wanted = new URLSearchParams(location.hash.slice(1));
for (const gallery of document.querySelectorAll(".gallery")) {{
  for (const [sel, key] of [[".cls", "class"], [".outcome", "outcome"]]) {{
    const box = gallery.querySelector(sel);
    if (wanted.has(key)) box.value = wanted.get(key);
    box.addEventListener("change", () => applyFilters(gallery));
  }}
  applyFilters(gallery);
}}
window.addEventListener("load", () => {{
  const broken = [...document.images].filter(i => i.complete && i.naturalWidth === 0);
  document.body.dataset.broken = broken.length;
  document.body.dataset.loaded = "1";
}});
</script>
</body></html>
"""

__all__ = ["write_report"]

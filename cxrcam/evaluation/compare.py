"""``cxrcam evaluate --pred A --pred B ...``: several submissions scored on the same bootstrap
resamples of the same truth images (:mod:`cxrcam.evaluation.bootstrap`), so their differences are
paired: each figure with its 95% interval, and each pair's difference with its interval and a
two-sided bootstrap p-value. Written as comparison.json, comparison.md and one plot."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from cxrcam.config import Config
from cxrcam.evaluation.bootstrap import bootstrap
from cxrcam.evaluation.evaluate import _clean, bootstrap_inputs, score
from cxrcam.files import atomic_write_text, save_figure, write_json

HEADLINE = ("mAP@0.4", "findings mAP@0.4", "RSNA score", "mean AUROC", "MaxBoxAccV2", "pointing game", "T(IoU)=0.5",
            "T(IoBB)=0.5")


def _names(scored, preds: list[Path]) -> list[str]:
    """What each submission is (localize.json's meaning), with its path where two would read alike."""
    labels = [s.metrics["submission_label"] for s in scored]
    return [f"{label} ({Path(p)})" if labels.count(label) > 1 or label == "submission" else label
            for label, p in zip(labels, preds)]


def compare(preds: list[str | Path], gt: str | Path, fmt: str = "vinbig", config: Config = Config(),
            lenient: bool = False, out: str | Path | None = None, resamples: int = 1000, seed: int = 0,
            plots: bool = True) -> dict:
    """Score every submission against ``gt`` and compare them on the same ``resamples`` (see the
    module docstring); with ``out``, comparison.json, comparison.md and (``plots``) comparison.png there."""
    seen: dict[Path, str | Path] = {}
    for p in preds:
        if Path(p).resolve() in seen:
            warnings.warn(f"{p} is given twice (as {seen[Path(p).resolve()]} too): a submission against itself differs "
                          f"by 0 on every resample, p = 1", stacklevel=2)
        seen.setdefault(Path(p).resolve(), p)
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    scored = [score(p, gt, fmt, config, lenient=lenient, control=False, out=out) for p in preds]
    names = _names(scored, [Path(p) for p in preds])
    result = bootstrap([bootstrap_inputs(s) for s in scored], len(scored[0].truth.image_ids), resamples, seed)
    comparison = _clean({
        "ground_truth": str(gt), "images": len(scored[0].truth.image_ids),
        "bootstrap": {k: result[k] for k in ("method", "level", "resamples", "seed", "unit")},
        "submissions": [{"name": n, "path": str(p), "figures": f} for n, p, f in zip(names, preds, result["submissions"])],
        "pairs": [{"a": names[pair["a"]], "b": names[pair["b"]], "figures": pair["figures"]}
                  for pair in result["pairs"]]})
    if out is not None:
        write_json(out / "comparison.json", comparison)
        atomic_write_text(out / "comparison.md", markdown(comparison))
        if plots:
            _plot(comparison, out / "comparison.png")
    return comparison


def with_interval(value: float, ci: list | tuple | None) -> str:
    """``0.126 [0.065, 0.147]``: a figure with its interval, or alone where the interval is undefined."""
    if not ci or ci[0] is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _ci(f: dict | None) -> str:
    value = f.get("value", f.get("difference")) if f else None
    return "-" if value is None else with_interval(value, f["ci"])


def p_text(p: float | None) -> str:
    """A bootstrap p-value as written: ``< 0.001`` where no resample reached the other side (never 0.000)."""
    return "-" if p is None else "< 0.001" if p < 0.001 else f"{p:.3f}"


def pair_sentence(a: str, b: str, f: dict, figure: str = "findings mAP@0.4") -> str:
    """``b`` against ``a`` in words: a paired difference of ``figure`` with its interval, its p-value,
    and whether that is beyond noise."""
    p = f"p {p_text(f['p'])}" if f["p"] < 0.001 else f"p = {p_text(f['p'])}"
    lo, hi = f["ci"]
    return (f"{b} against {a} (paired, same resamples): {figure} {f['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}], "
            f"{p}: {'beyond noise' if beyond_noise(f) else 'not beyond noise'}")


def markdown(c: dict) -> str:
    """The figures of every submission with their intervals, then each pair's differences."""
    b = c["bootstrap"]
    figures = [k for k in HEADLINE if any(k in s["figures"] for s in c["submissions"])]
    lines = [f"{c['images']} images; {int(b['level'] * 100)}% {b['method']} intervals from {b['resamples']} "
             f"bootstrap resamples of the images (seed {b['seed']}).", "",
             "| submission | " + " | ".join(figures) + " |", "|---" * (len(figures) + 1) + "|"]
    for s in c["submissions"]:
        lines.append(f"| {s['name']} | " + " | ".join(_ci(s["figures"].get(k)) for k in figures) + " |")
    lines += ["", "Paired differences (b - a), with a two-sided bootstrap p-value:", "",
              "| b | a | figure | difference [95% CI] | p |", "|---|---|---|---|---|"]
    for pair in c["pairs"]:
        for k in figures:
            f = pair["figures"].get(k)
            if f:
                lines.append(f"| {pair['b']} | {pair['a']} | {k} | {_ci(f)} | {p_text(f['p'])} |")
    return "\n".join(lines) + "\n"


def beyond_noise(pair_figure: dict, alpha: float = 0.05) -> bool:
    """Whether a paired difference is evidence: its interval excludes 0 (p < alpha)."""
    p = pair_figure.get("p")
    return p is not None and not math.isnan(p) and p < alpha


def _plot(c: dict, path: Path) -> None:
    """Each figure with its interval per submission (left), each pair's differences (right); the
    submissions are lettered A, B, ... with their names below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = [k for k in HEADLINE if any(k in s["figures"] for s in c["submissions"])]
    letters = {s["name"]: chr(ord("A") + k) for k, s in enumerate(c["submissions"])}
    n_sub = len(c["submissions"])
    rows = [(f"{letters[p['b']]} - {letters[p['a']]}: {f}", p["figures"][f]) for p in c["pairs"] for f in figures
            if f in p["figures"]]
    height = max(0.45 * len(figures) * (n_sub + 1), 0.3 * len(rows)) + 1.2 + 0.25 * n_sub
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, height))
    for k, s in enumerate(c["submissions"]):
        y = np.arange(len(figures)) * (n_sub + 1) + k
        vals = [s["figures"].get(f, {}) for f in figures]
        x = np.array([v.get("value") if v.get("value") is not None else np.nan for v in vals], float)
        err = np.array([[max(0, xi - v["ci"][0]), max(0, v["ci"][1] - xi)] if v.get("ci") and v["ci"][0] is not None
                        else [0, 0] for xi, v in zip(x, vals)]).T
        left.errorbar(x, y, xerr=err, fmt="o", capsize=3, label=f"{letters[s['name']]}: {s['name']}")
    left.set_yticks(np.arange(len(figures)) * (n_sub + 1) + (n_sub - 1) / 2, figures)
    left.invert_yaxis()
    left.set(xlim=(0, 1), title="each figure, 95% CI")
    for k, (label, f) in enumerate(rows):
        colour = "C3" if beyond_noise(f) else "grey"
        lo, hi = f["ci"] if f["ci"][0] is not None else (f["difference"], f["difference"])
        right.plot([lo, hi], [k, k], color=colour)
        right.plot([f["difference"]], [k], "o", color=colour)
    right.axvline(0, color="black", lw=0.8)
    right.set_yticks(range(len(rows)), [label for label, _ in rows])
    right.invert_yaxis()
    right.set_title("paired differences, 95% CI (red: p < 0.05)")
    fig.legend(loc="lower center", fontsize=8, ncol=1, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * n_sub, 1, 1))
    save_figure(fig, path)


__all__ = ["compare", "markdown", "beyond_noise", "pair_sentence", "p_text", "with_interval", "HEADLINE"]

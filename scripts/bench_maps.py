"""CAM quality over several trainings (issue 26): which heat map draws the finding, as mean +- sd.

One synthetic train set and one held-out test set (another seed); the classifier is trained
``--train-seeds`` times (``train.seed``: initialisation, shuffling, augmentation), each through the
real pipeline up to the CAM rows (``cxrcam.demo``, cam-only): prepare, train-classifier,
calibrate (which now also chooses the map, confirmed on held-out halves of the validation fold),
localize at 0.65 and calibrated, evaluate. Then each ``--variant`` map is cut at the configured
threshold on the same test set (localize + evaluate), so every row of the table is the same
trainings seen through another map.

Per row: MaxBoxAccV2 beside its random-map control, pointing game, T(IoBB)=0.5 and T(IoU)=0.5
(controls in brackets), findings mAP@0.4 beside its random-map control, as mean +- sd over the
trainings, and the classifier's AUROC.

    python scripts/bench_maps.py --out /tmp/maps --n-images 800 --n-test 400 --train-seeds 0 1 2 \\
        --variant gradcam++ --variant layercam@layer3 --variant layercam@layer3,layer4
    python scripts/bench_maps.py --out /tmp/maps_real ... --backgrounds normals/   # findings in real anatomy
    python scripts/bench_maps.py --out /tmp/maps_old ... --profile uniform         # the world before issue 35
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from cxrcam.cam import parse_map
from cxrcam.cli import main as cli
from cxrcam.demo import TINY, PipelineSettings, bench_parser, pipeline_stages, run_command, run_pipeline
from cxrcam.evaluation.compare import beyond_noise
from cxrcam.evaluation.evaluate import headline

FIGURES = ("MaxBoxAccV2", "pointing game", "pointing, own class (multi-finding images)", "pointing, another finding's box",
           "T(IoBB)=0.5", "T(IoU)=0.5", "findings mAP@0.4")


def variant_args(text: str) -> list[str]:
    """``METHOD[@LAYER[,LAYER]] [section.key=value ...]``: the map, and any other setting of the row."""
    first, *overrides = text.split()
    method, layer = parse_map(first)
    return [f"cam.method={method}", f"cam.target_layer={layer}", *overrides]


def variant_folder(text: str) -> str:
    return "variant_" + "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text.replace("@", "_"))


PAIRED = ("MaxBoxAccV2", "pointing game", "T(IoBB)=0.5", "findings mAP@0.4")


def paired_marks(comparison: Path) -> dict[str, str]:
    """Per figure of :data:`PAIRED`: "+" / "-" where the row beats / trails the configured one beyond
    noise (evaluate's paired bootstrap, p < 0.05), else "=" ."""
    figures = json.loads(comparison.read_text())["pairs"][0]["figures"]
    return {k: ("=" if k not in figures or not beyond_noise(figures[k]) else
                "+" if figures[k]["difference"] > 0 else "-") for k in PAIRED}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--config", default=TINY, help="a shipped config's name or a YAML file")
    parser.add_argument("--data-seed", type=int, default=7, help="the synthetic sets' seed (tests use others)")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variant", action="append", default=[],
                        help="'METHOD[@LAYER[,LAYER]] [section.key=value ...]': a map (and settings) cut at 0.65, "
                             "or at its own boxes.threshold")
    parser.add_argument("--normal-fraction", type=float, default=None)
    parser.add_argument("--profile", choices=["vinbig", "uniform"], default="vinbig",
                        help="the world the sets are drawn from (uniform: the one of issue 26's table)")
    parser.add_argument("--backgrounds", type=Path, default=None, help="normal radiographs to insert findings into")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every stage")
    a = parser.parse_args()
    start = time.perf_counter()
    rows: dict[str, list[dict]] = {}
    aurocs = []
    for seed in a.train_seeds:
        out = a.out / f"train_seed{seed}"
        settings = PipelineSettings(
            out, a.n_images, a.size, a.epochs, 1, a.data_seed, a.model, a.config, [*a.overrides, f"train.seed={seed}"],
            pictures=False, n_test=a.n_test, cam_only=True, reuse=(out / "summary.json").is_file(),
            normal_fraction=a.normal_fraction, profile=a.profile, backgrounds=a.backgrounds, map_search=True)
        summary, stages = run_pipeline(cli, settings), pipeline_stages(settings)
        aurocs.append(summary["mean_auroc"])
        folders = {"configured map, threshold 0.65": out / "localize", "calibrated (map and thresholds)": out / "calibrated"}
        for text in a.variant:
            folder = out / variant_folder(text)
            if not (folder / "eval" / "metrics.json").is_file():
                run_command(cli, *stages.localize(folder, "--threshold", 0.65, "--no-images", *variant_args(text)))
                run_command(cli, *stages.evaluate(folder, folder / "eval"))
            folders[text if "boxes.threshold=" in text else f"{text}, threshold 0.65"] = folder
        configured = folders["configured map, threshold 0.65"]
        for name, folder in folders.items():
            metrics = json.loads((folder / "eval" / "metrics.json").read_text())
            chosen = json.loads((folder / "localize.json").read_text()).get("cam", {})
            marks = {}
            if folder != configured:  # paired against the configured map, same test images and resamples
                if not (folder / "vs_configured" / "comparison.json").is_file():
                    run_command(cli, *stages.evaluate([configured, folder], folder / "vs_configured"))
                marks = paired_marks(folder / "vs_configured" / "comparison.json")
            rows.setdefault(name, []).append({"figures": headline(metrics), "cam": chosen, "paired": marks})
    lines = [f"command: {' '.join(sys.argv)}", f"machine: {platform.machine()}, {platform.processor() or 'cpu'}",
             f"{len(a.train_seeds)} trainings, {(time.perf_counter() - start) / 60:.1f} min; classifier mean AUROC "
             f"{np.mean(aurocs):.3f} +- {np.std(aurocs, ddof=1) if len(aurocs) > 1 else 0:.3f}", "",
             "Each cell: mean +- sd over the trainings (random-map control in brackets); then, per training, "
             "+ / - where the row beats / trails the configured map beyond noise (paired bootstrap), = where not.", "",
             "| map | " + " | ".join(FIGURES) + " |", "|---" * (len(FIGURES) + 1) + "|"]
    for name, runs in rows.items():
        cells = []
        for figure in FIGURES:
            model, control = (np.array([np.nan if r["figures"][figure][k] is None else r["figures"][figure][k]
                                        for r in runs], float) for k in (0, 1))
            sd = np.std(model, ddof=1) if len(model) > 1 else 0.0
            control_text = f" ({np.nanmean(control):.3f})" if np.isfinite(control).any() else ""
            marks = "".join(r.get("paired", {}).get(figure, "") for r in runs)
            cells.append(f"{np.nanmean(model):.3f} +- {sd:.3f}{control_text}{' ' + marks if marks else ''}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    chosen = [f"{r['cam'].get('method')}@{r['cam'].get('target_layer')}" for r in rows["calibrated (map and thresholds)"]]
    lines += ["", f"maps chosen by calibrate, per training: {', '.join(chosen)}"]
    for seed in a.train_seeds:  # what calibrate chose besides the map: threshold mode, scales
        cal = json.loads((a.out / f"train_seed{seed}" / "calibration.json").read_text())
        scales = {n: e["scale"] for n, e in cal["classes"].items() if e.get("scale", 1) != 1}
        lines.append(f"training {seed}: threshold mode {cal['cam'].get('threshold_mode')}, box scales "
                     f"{scales or 'all 1'}")
    text = "\n".join(lines)
    (a.out / "maps.md").write_text(text + "\n")
    (a.out / "maps.json").write_text(json.dumps(rows, indent=2, default=str))
    print("\n" + text)


if __name__ == "__main__":
    main()

"""Retrained levers (issue 36: pooling heads, input size): a classifier trained with overrides on
the caches of existing ``scripts/bench_maps.py`` trainings, its maps scored paired against that
training's configured maps on the same test images.

For each ``--base`` folder (``bench_maps``' ``train_seedN``) and each ``--variant`` (overrides,
e.g. ``model.pooling=pcam``; ``prepare.size=256`` caches the base's images again at that size), with
the real commands: ``train-classifier`` on the base's train
cache with the base's ``train.seed`` and epochs, ``localize --threshold 0.65 --no-images`` on its
test cache, ``evaluate``, and ``evaluate --pred BASE --pred VARIANT`` (paired bootstrap). The
table has each figure as mean +- sd over the bases and, per base, the paired difference and
whether it is beyond noise.

    python scripts/bench_retrain.py --base /tmp/levers/train_seed0 --base /tmp/levers/train_seed1 \\
        --out /tmp/pool --variant model.pooling=pcam --variant model.pooling=csra
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cxrcam.cli import main as cli
from cxrcam.demo import TINY, Stages, run_command
from cxrcam.evaluation.compare import beyond_noise, p_text
from cxrcam.files import load_checkpoint

FIGURES = ("mean AUROC", "MaxBoxAccV2", "pointing game", "T(IoBB)=0.5", "findings mAP@0.4")


def figures(comparison: dict, k: int) -> dict[str, float]:
    return {f: comparison["submissions"][k]["figures"].get(f, {}).get("value") for f in FIGURES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, action="append", required=True, help="a bench_maps train_seedN folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", action="append", required=True, help="overrides, space separated")
    parser.add_argument("--base-pred", default="localize",
                        help="the base's folder of maps to compare against (a bench_maps variant folder where the "
                             "configured map has changed since, e.g. variant_layercam_layer3)")
    parser.add_argument("--config", default=TINY)
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    table: dict[str, list[tuple[dict, dict, dict]]] = {}
    seconds: dict[str, list[float]] = {}
    for base_dir in a.base:
        trained = load_checkpoint(base_dir / "runs" / "classifier" / "best.pt", "cpu", kind="classifier")["config"]
        base = Stages(base_dir, 0, a.config, [f"train.seed={trained['train']['seed']}",
                                              f"train.epochs={trained['train']['epochs']}"])
        for text in a.variant:
            name = text.replace(" ", "_").replace("=", "_")
            out = a.out / f"{base_dir.name}_{name}"
            size = next((int(o.split("=")[1]) for o in text.split() if o.startswith("prepare.size=")), None)
            stages = Stages(out, size or 0, a.config, [*base.common, *text.split()])
            if size:  # another input size: the base's images cached again at it
                stages.data = base.data
                for split in ("train", "test"):
                    if not (stages.cache(split) / "cache.json").is_file():
                        run_command(cli, *stages.prepare(split))
            else:
                stages.cache = base.cache  # the base's data and cache, this variant's training
            if not (stages.classifier.is_file() and (out / "seconds.json").is_file()):
                start = time.perf_counter()
                run_command(cli, *stages.train_classifier())
                (out / "seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
            loc = out / "localize"
            if not (loc / "submission.csv").is_file():
                run_command(cli, *stages.localize(loc, "--threshold", 0.65, "--no-images"))
            cmp = out / "vs_base"
            if not (cmp / "comparison.json").is_file():
                run_command(cli, *base.evaluate([base_dir / a.base_pred, loc], cmp, "--no-plots"))
            comparison = json.loads((cmp / "comparison.json").read_text())
            pair = comparison["pairs"][0]["figures"]
            table.setdefault(text, []).append((figures(comparison, 0), figures(comparison, 1), pair))
            seconds.setdefault(text, []).append(json.loads((out / "seconds.json").read_text())["seconds"])

    def stat(values) -> str:
        values = np.array([np.nan if v is None else v for v in values], np.float64)
        return f"{np.nanmean(values):.3f} +- {np.nanstd(values):.3f}"

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    lines = [f"command: {' '.join(sys.argv)}", f"device: {device}, torch {torch.__version__}", ""]
    for text, runs in table.items():
        lines += [f"**{text}** ({len(runs)} trainings; training s: {', '.join(f'{s:.0f}' for s in seconds[text])})",
                  "", "| figure | base (configured map) | variant | variant - base, per training (p) |",
                  "|---|---|---|---|"]
        for f in FIGURES:
            per = []
            for _, _, pair in runs:
                d = pair.get(f)
                per.append("-" if not d else f"{d['difference']:+.3f} ({p_text(d['p'])}){' *' if beyond_noise(d) else ''}")
            lines.append(f"| {f} | {stat(r[0][f] for r in runs)} | {stat(r[1][f] for r in runs)} | {', '.join(per)} |")
        lines.append("")
    lines.append("(* beyond noise: the paired 95% interval excludes 0)")
    text = "\n".join(lines)
    (a.out / "summary.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()

"""The demo and benchmark driver: every stage on synthetic data, each run as the real ``cxrcam`` command.

``cxrcam demo`` and the scripts under ``scripts/`` call :func:`run_pipeline`: a synthetic
VinBigData-layout train set and a held-out test set (another seed), prepare, train the
classifier, calibrate its thresholds on the training cache's validation fold, localize the test
set at 0.65 and calibrated, train the detector (started from the classifier; with ``cam_proposals``
its RoI heads also train on the calibrated CAM proposals), refine with the calibrated thresholds,
evaluate, and one table. Each stage is the ``cxrcam`` command a user would type
(:class:`Stages` writes each command line, in one place; ``scripts/bench_scale.py`` and
``scripts/gpu_check.py`` run the same lines their own way), printed first and run through the same
command line parser, in this process (:func:`cxrcam.runtime.inprocess.run_in_process`; the caller
passes the command line group, ``cxrcam.cli.main``), with its progress bars.
"""
from __future__ import annotations

import argparse
import functools
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from cxrcam.config import config_path
from cxrcam.errors import CxrcamError
from cxrcam.evaluation.compare import beyond_noise, pair_sentence, with_interval
from cxrcam.evaluation.evaluate import findings_map, headline
from cxrcam.runtime.inprocess import run_in_process

TINY = config_path("tiny")  # the shipped config of the demo and the CPU benchmarks
SMALL = 100  # train sets below this many images are split in 2 folds, so the validation fold has boxes


@dataclass
class PipelineSettings:
    out: Path
    n_images: int = 200  # training images
    size: int = 128  # cache side in pixels
    epochs: int = 8  # classifier epochs
    detector_epochs: int = 4
    seed: int = 0  # the test set uses seed + 1000
    model: str = "resnet10t"  # timm name of the classifier and the detector's backbone
    config: str | Path = TINY  # a shipped config's name or a YAML path
    overrides: list[str] = field(default_factory=list)  # section.key=value for every stage
    plain: bool = False  # also run the plain detector (no CAM proposals, no gating) and gating alone
    pictures: bool = True
    n_test: int = 0  # held-out test images; 0 = half as many as n_images (at least 10)
    cam_only: bool = False  # stop after the CAM rows (no detector)
    reuse: bool = False  # keep the data, caches and classifier already in ``out``
    # the detector's RoI heads also train on the classifier's calibrated CAM proposals
    # (detector.cam_proposals_from): off, as with truth boxes on every image it cost 0.02 mAP (BENCHMARKS)
    cam_proposals: bool = False
    normal_fraction: float | None = None  # share of normal images in both synthetic sets (None: the profile's)
    profile: str = "vinbig"  # what synth draws from: VinBigData's released table, or "uniform" (the old world)
    backgrounds: Path | None = None  # normal radiographs the findings are inserted into (synth --backgrounds)
    dataset: str = "vinbig"  # the synthetic sets' layout (synth --format, prepare --dataset): vinbig or nih
    # calibrate's search among candidate maps (off: the configured map's thresholds and box scales alone). On the
    # tables' world the map it chose by held-out AP did not carry to the test set (docs/BENCHMARKS.md, issue 36)
    map_search: bool = False


@dataclass
class Stages:
    """Each stage's command line for a run folder ``out``: synthetic sets under ``data/``, their
    caches under ``cache/``, the trainings under ``runs/``. ``config`` and ``common`` (the
    ``section.key=value`` overrides) go to every stage that takes a config."""

    out: Path
    size: int
    config: str | Path = TINY
    common: list[str] = field(default_factory=list)
    dataset: str = "vinbig"  # the layout synth writes and prepare reads

    def data(self, name: str) -> Path:
        return self.out / "data" / name

    def cache(self, name: str) -> Path:
        return self.out / "cache" / name

    @property
    def classifier(self) -> Path:
        return self.out / "runs" / "classifier" / "best.pt"

    @property
    def detector(self) -> Path:
        return self.out / "runs" / "detector" / "best.pt"

    @property
    def calibration(self) -> Path:
        return self.out / "calibration.json"

    @property
    def settings(self) -> list:
        return ["--config", self.config, *self.common]

    def synth(self, name: str, n: int, seed: int, *extra: Any, split: str = "train") -> list:
        split_args = ["--split", split] if self.dataset == "vinbig" else []  # nih writes its released layout only
        return ["synth", "--format", self.dataset, "--out", self.data(name), "--n-images", n, "--seed", seed,
                "--size", int(self.size * 1.5), *split_args, *extra, "--overwrite"]

    def prepare(self, name: str, *extra: Any, data: str | None = None) -> list:
        """Cache ``name`` of the synthetic set ``data`` (default: the set of the same name)."""
        return ["prepare", "--dataset", self.dataset, "--root", self.data(data or name), "--out", self.cache(name),
                "--size", self.size, "--overwrite", *self.settings, *extra]

    def train_classifier(self, *extra: Any, data: str = "train", out: Path | None = None) -> list:
        return ["train-classifier", "--data", self.cache(data), "--out", out or self.classifier.parent, "--overwrite",
                *self.settings, *extra]

    def calibrate(self, *extra: Any, data: str = "train") -> list:
        return ["calibrate", "--checkpoint", self.classifier, "--data", self.cache(data), "--out", self.calibration,
                *self.settings, *extra]

    def localize(self, folder: Path, *extra: Any, data: str = "test") -> list:
        return ["localize", "--checkpoint", self.classifier, "--data", self.cache(data), "--out", folder,
                *self.settings, *extra]

    def train_detector(self, *extra: Any, data: str = "train", out: Path | None = None,
                       init: Path | None = None) -> list:
        return ["train-detector", "--data", self.cache(data), "--out", out or self.detector.parent, "--overwrite",
                *self.settings, f"detector.init={init or self.classifier}", *extra]

    def refine(self, folder: Path, *extra: Any, data: str = "test", detector: Path | None = None,
               classifier: Path | None = None) -> list:
        return ["refine", "--classifier", classifier or self.classifier, "--detector", detector or self.detector,
                "--data", self.cache(data),
                "--out", folder, *self.settings, *extra]

    def evaluate(self, folders: Path | list[Path], out: Path, *extra: Any, gt: str = "test") -> list:
        preds = [a for f in (folders if isinstance(folders, list) else [folders]) for a in ("--pred", f)]
        return ["evaluate", *preds, "--gt", self.cache(gt), "--out", out, *self.settings, *extra]


def bench_parser(doc: str | None, n_images: int = 800, n_test: int = 400, size: int = 128, epochs: int = 10,
                 n_test_help: str | None = None) -> argparse.ArgumentParser:
    """The command line that ``scripts/bench_*.py`` pipeline benchmarks share (where, how many images,
    at what size, how many classifier epochs); each script adds its own options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n-images", type=int, default=n_images, help="training images")
    parser.add_argument("--n-test", type=int, default=n_test, help=n_test_help or "held-out test images")
    parser.add_argument("--size", type=int, default=size, help="the model's input size (prepare.size)")
    parser.add_argument("--epochs", type=int, default=epochs, help="classifier epochs")
    return parser


def run_command(cli: click.Command, *args: Any) -> None:
    """Run one ``cxrcam`` command (``cli``: the command line group) as a user would type it, printed
    first, in this process; its wall time printed after (where a run's minutes go)."""
    args = [str(a) for a in args]
    line = f"cxrcam {shlex.join(args)}"
    print(f"\n$ {line}", flush=True)
    start = time.perf_counter()
    code = run_in_process(cli, args)
    print(f"cxrcam {args[0]}: {time.perf_counter() - start:.1f} s", flush=True)
    if code != 0:
        raise CxrcamError(f"stage failed: {line}")


def pipeline_stages(s: PipelineSettings) -> Stages:
    """The command lines of a :class:`PipelineSettings` run (its model, epochs and overrides on every stage)."""
    # a small train set keeps boxes on its validation fold (calibrate's boxed set) with 2 folds, not 5
    folds = [] if s.n_images >= SMALL or any(o.startswith("split.n_folds=") for o in s.overrides) else ["split.n_folds=2"]
    common = [f"model.name={s.model}", f"train.epochs={s.epochs}", f"detector.backbone={s.model}",
              f"detector.epochs={s.detector_epochs}", *folds, *s.overrides]
    return Stages(Path(s.out), s.size, s.config, common, s.dataset)


def run_pipeline(cli: click.Command, s: PipelineSettings) -> dict[str, Any]:
    """Run every stage into ``s.out`` through the command line group ``cli``; returns the summary
    (also ``summary.json`` there)."""
    command = functools.partial(run_command, cli)
    out, start = Path(s.out), time.perf_counter()
    stages = pipeline_stages(s)
    n_test = s.n_test or max(10, s.n_images // 2)
    world = [] if s.normal_fraction is None else ["--normal-fraction", s.normal_fraction]
    world += ["--profile", s.profile, *(["--backgrounds", s.backgrounds] if s.backgrounds else [])]
    for split, n, seed in (("train", s.n_images, s.seed), ("test", n_test, s.seed + 1000)):
        if not (s.reuse and (stages.cache(split) / "cache.json").is_file()):
            command(*stages.synth(split, n, seed, *world, split=split))
            command(*stages.prepare(split))
    if not (s.reuse and stages.classifier.is_file()):
        command(*stages.train_classifier())
    no_images = [] if s.pictures else ["--no-images"]
    command(*stages.calibrate(*([] if s.map_search else ["--maps", "none"])))
    command(*stages.localize(out / "localize", "--threshold", 0.65, *no_images))
    command(*stages.localize(out / "calibrated", "--threshold", stages.calibration, "--no-images"))
    results = {"cam": out / "localize", "calibrated": out / "calibrated"}
    if not s.cam_only:
        weak = [f"detector.cam_proposals_from={stages.classifier}"] if s.cam_proposals else []
        command(*stages.train_detector(f"boxes.calibration={stages.calibration}", *weak))
        calibrated = ["--threshold", stages.calibration]
        command(*stages.refine(out / "refine", *calibrated, *no_images))
        results["refined"] = out / "refine"
        if s.plain:  # the ablations: the detector alone, and gated without CAM proposals
            for name, gate in (("plain", "none"), ("gated", "product")):
                command(*stages.refine(out / name, *calibrated, "--no-images", "refine.proposals=rpn",
                                       f"refine.gate={gate}"))
                results[name] = out / name
    metrics = {}
    for name, folder in results.items():
        command(*stages.evaluate(folder, folder / "eval", "--ci",
                                 *([] if name in ("cam", "calibrated") else ["--no-control"])))
        metrics[name] = json.loads((folder / "eval" / "metrics.json").read_text())
    comparison = None
    if "refined" in results:  # does refinement beat the CAM boxes it starts from, beyond noise? (paired)
        command(*stages.evaluate([results["calibrated"], results["refined"]], out / "comparison"))
        comparison = json.loads((out / "comparison" / "comparison.json").read_text())
    summary = _summary(metrics, out, time.perf_counter() - start, comparison)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _summary(metrics: dict[str, dict], out: Path, seconds: float, comparison: dict | None = None) -> dict[str, Any]:
    cam = metrics["cam"]
    paired = None
    if comparison:
        f = comparison["pairs"][0]["figures"].get("findings mAP@0.4")
        paired = f and {"figure": "findings mAP@0.4", **f, "beyond_noise": beyond_noise(f)}
    return {
        "mean_auroc": cam.get("mean_auroc"), "auroc": cam.get("auroc", {}),
        "map": {name: m["map"] for name, m in metrics.items()},
        "map_findings": {name: findings_map(m["ap"]) for name, m in metrics.items()},
        "ap": {name: m["ap"] for name, m in metrics.items()},
        "cam_rows": {name: headline(m) for name, m in metrics.items() if name in ("cam", "calibrated")},
        "ci": {name: m.get("ci", {}) for name, m in metrics.items()},
        "refined_vs_cam": paired,
        "seconds": seconds,
        "paths": {"pictures": str(out / "localize"), "refined pictures": str(out / "refine"),
                  "submission": str(out / "refine" / "submission.csv"),
                  "CAM submission": str(out / "localize" / "submission.csv"),
                  "calibration": str(out / "calibration.json")},
    }


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _ci(v: float | None, interval: list | None) -> str:
    """A figure with its bootstrap interval, when it has one."""
    return _fmt(v) if v is None else with_interval(v, interval)


def summary_table(summary: dict[str, Any]) -> str:
    """The tables: classifier AUROC and mAP@0.4 of every submission; then the CAM figures at 0.65
    and calibrated, each with its random-map control in brackets."""
    names = {"cam": "CAM-only, threshold 0.65", "calibrated": "CAM-only, calibrated thresholds",
             "refined": "refined (Faster R-CNN)", "plain": "plain detector", "gated": "detector + gate, no CAM proposals"}
    ci = summary.get("ci", {})
    rows = [("classifier mean AUROC (test set)", _ci(summary["mean_auroc"], ci.get("cam", {}).get("mean AUROC")), "")]
    rows += [(names[k], _ci(v, ci.get(k, {}).get("mAP@0.4")), _ci(summary["map_findings"][k],
                                                                   ci.get(k, {}).get("findings mAP@0.4")))
             for k, v in summary["map"].items()]
    width = max(len(r[0]) for r in rows)
    lines = ["(95% bootstrap intervals over the test images in brackets)", "",
             f"{'submission':<{width}}  {'mAP@0.4':>22}  {'findings mAP@0.4':>22}", f"{'-' * width}  {'-' * 22}  {'-' * 22}"]
    lines += [f"{a:<{width}}  {b:>22}  {c:>22}" for a, b, c in rows]
    paired = summary.get("refined_vs_cam")
    if paired:
        lines += ["", pair_sentence("CAM-only calibrated", "refined", paired, paired["figure"])]
    cam_rows = summary.get("cam_rows", {})
    if cam_rows:
        labels = list(next(iter(cam_rows.values())))
        lines += ["", "CAM localisation (random-map control in brackets):", "",
                  "| CAM boxes | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for key, row in cam_rows.items():
            cells = [f"{_fmt(m)} ({_fmt(c)})" for m, c in row.values()]
            lines.append(f"| {names[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["PipelineSettings", "Stages", "pipeline_stages", "run_pipeline", "summary_table", "run_command", "TINY"]

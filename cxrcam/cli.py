"""The ``cxrcam`` command line: a thin layer over the stage modules.

Every command reads its settings from ``--config`` (a shipped config's name, or a YAML file) plus trailing
``section.key=value`` overrides. User mistakes (missing files, wrong columns, unknown config
keys) print one ``Error:`` line and exit 1, never a traceback.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import click

from cxrcam import __version__
from cxrcam.config import WBF_CONF_TYPES, Config, config_path, load_config, shipped_configs
from cxrcam.errors import CxrcamError
from cxrcam.schemas import PLAIN, SCHEMAS


REFINE_DRAW_MIN_SCORE = 0.1  # refine pictures draw the detections scored at least this


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """A warning as one line for the user, not the source line that raised it."""
    return f"warning: {message}\n"


class _Group(click.Group):
    """Turns cxrcam's user errors into one readable line and a non-zero exit."""

    def invoke(self, ctx):
        warnings.formatwarning = _warning_line
        try:
            return super().invoke(ctx)
        except (CxrcamError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
            raise click.ClickException(str(exc)) from None


class ThresholdParam(click.ParamType):
    """``--threshold``: a number in [0, 1] for every class, or a calibration.json with one per class."""

    name = "T|calibration.json"

    def convert(self, value, param, ctx):
        if isinstance(value, (float, Path)):
            return value
        try:
            number = float(value)
        except ValueError:
            path = Path(value)
            if not path.is_file():
                self.fail(f"{value!r} is neither a number in [0, 1] nor a calibration file", param, ctx)
            return path
        if not 0 <= number <= 1:
            self.fail(f"{number} is not in [0, 1]", param, ctx)
        return number


def device_option(func):
    """``--device``: where the command runs [config: runtime.device]."""
    return click.option("--device", help="auto (a GPU where torch sees one, else the CPU), cpu, cuda or cuda:N "
                                         "[config: runtime.device, auto].")(func)


def _set_device(config: Config, device: str | None) -> None:
    if device is not None:
        config.runtime.device = device


class ConfigParam(click.ParamType):
    """``--config``: a shipped config's name (``resnet50``) or a YAML file."""

    name = "NAME|FILE"

    def convert(self, value, param, ctx):
        if isinstance(value, Path):
            return value
        try:
            return config_path(value)
        except CxrcamError as exc:
            self.fail(str(exc), param, ctx)


def config_options(func):
    """``--config NAME|FILE`` and trailing ``section.key=value`` overrides -> ``config: Config``."""

    @click.option("--config", "config_path", type=ConfigParam(),
                  help=f"Settings: a shipped config ({', '.join(shipped_configs())}) or a YAML file of your own; "
                       f"defaults are built in (the default config lists every key).")
    @click.argument("overrides", nargs=-1, metavar="[SECTION.KEY=VALUE]...")
    @functools.wraps(func)
    def wrapper(config_path, overrides, **kwargs):
        return func(config=load_config(config_path, overrides), **kwargs)

    return wrapper


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120, "terminal_width": 120})
@click.version_option(__version__, prog_name="cxrcam")
def main() -> None:
    """Find and localise 14 thoracic findings on chest radiographs with weak supervision.

    Typical flow: synth or bring data -> prepare -> train-classifier -> localize -> evaluate.
    """


@main.command()
@click.option("--format", "fmt", type=click.Choice(["vinbig", "nih", "rsna"]), default="vinbig", show_default=True,
              help="Layout to write: VinBigData (DICOM + train.csv), NIH (PNG + Data_Entry/BBox_List) or RSNA "
                   "Pneumonia (stage_2_train_labels.csv + stage_2_train_images/<patientId>.dcm).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Dataset folder to create.")
@click.option("--n-images", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=click.IntRange(min=64), default=512, show_default=True,
              help="Typical image side in pixels (VinBigData images vary around it).")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="vinbig: train.csv + train/, or a labelled held-out set as test.csv + test/.")
@click.option("--profile", type=click.Choice(["vinbig", "nih", "rsna", "uniform"]),
              help="Statistics the set is drawn from: the format's own released table (default: finding sets, "
                   "readers, box sizes and positions as in VinBigData's train.csv, NIH's tables or RSNA's labels), "
                   "or uniform (the earlier flat generator, to reproduce old figures; not for rsna).")
@click.option("--backgrounds", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder of normal radiographs (DICOM/PNG/JPEG) to insert the findings into, augmented; a third "
                   "of them (by name) serve --split test only, the rest the training split.")
@click.option("--normal-fraction", type=click.FloatRange(0, 1),
              help="Share of images without findings [the profile's: 0.707 VinBigData, 0.538 NIH, 0.775 RSNA; "
                   "uniform 2/3].")
@click.option("--overwrite", is_flag=True,
              help="Replace a dataset already in --out (refused otherwise): its table and images are removed first.")
def synth(fmt: str, out: Path, n_images: int, seed: int, size: int, split: str, profile: str | None,
          backgrounds: Path | None, normal_fraction: float | None, overwrite: bool) -> None:
    """Write a synthetic chest X-ray dataset in a real dataset layout, drawn from the released tables.

    \b
    cxrcam synth --out data/train --n-images 600
    cxrcam synth --out data/test --n-images 200 --split test --seed 1000    # one consensus reading per finding
    cxrcam synth --out data/real --n-images 600 --backgrounds normals/      # findings in real anatomy
    cxrcam synth --out data/old --n-images 600 --profile uniform            # the generator of before
    cxrcam synth --format rsna --out data/rsna --n-images 600 --size 256    # RSNA Pneumonia's layout
    """
    from cxrcam.data.synth import synthesize

    synthesize(fmt, out, n_images, seed=seed, size=size, split=split, overwrite=overwrite,
               normal_fraction=normal_fraction, profile=profile, backgrounds=backgrounds)
    click.echo(f"wrote {n_images} {fmt} images ({profile or fmt} profile{', real backgrounds' if backgrounds else ''})"
               f" to {out}")


@main.command()
@click.option("--dataset", type=click.Choice(list(SCHEMAS)), required=True)
@click.option("--root", type=click.Path(exists=True, path_type=Path), required=True,
              help="Dataset folder as released (e.g. train.csv + train/*.dicom).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Cache folder.")
@click.option("--size", type=click.IntRange(min=16), help="Cached image side in pixels [config: prepare.size, 512].")
@click.option("--workers", type=click.IntRange(min=0), help="Decoding processes, 0 = all cores [config: prepare.workers].")
@click.option("--overwrite", is_flag=True,
              help="Replace a cache already in --out (its files and images) instead of resuming it.")
@config_options
def prepare(dataset: str, root: Path, out: Path, size: int | None, workers: int | None, overwrite: bool,
            config: Config) -> None:
    """Decode every image once into a resized training cache; a run into the same --out resumes."""
    from cxrcam.data.cache import prepare as run_prepare

    if size is not None:
        config.prepare.size = size
    if workers is not None:
        config.prepare.workers = workers
    result = run_prepare(dataset, root, out, config, overwrite=overwrite)
    click.echo(f"cached {result.cached} images ({result.skipped} already done, {result.failed} failed) "
               f"in {result.seconds:.1f}s -> {out}")
    if result.failed:
        click.echo(f"failures listed with reasons in {out / 'failures.csv'}", err=True)


def training_options(outputs: str):
    """The options both trainers take: a cache, a run folder holding ``outputs``, resume or
    overwrite, the device, and the config."""
    def wrap(func):
        options = [
            click.option("--data", type=click.Path(exists=True, path_type=Path), required=True,
                         help="A `cxrcam prepare` cache."),
            click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
                         help=f"Run folder: {outputs}."),
            click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt."),
            click.option("--overwrite", is_flag=True,
                         help="Start a new run in an --out that holds one (refused otherwise)."),
        ]
        for option in reversed(options):
            func = option(func)
        return config_options(device_option(func))
    return wrap


@main.command("train-classifier")
@training_options("best.pt, last.pt, metrics.csv, curves.png")
def train_classifier(data: Path, out: Path, resume: bool, overwrite: bool, device: str | None, config: Config) -> None:
    """Fine-tune a timm multi-label classifier (BCE) on a cache; torchrun for several GPUs.

    \b
    cxrcam train-classifier --config resnet50 --data cache/ --out runs/r50
    torchrun --nproc_per_node 4 -m cxrcam train-classifier --config densenet121 ...
    """
    from cxrcam.train.classifier import train_classifier as run

    _set_device(config, device)
    _done(run(config, data, out, resume=resume, overwrite=overwrite), "val_mean_auroc", "validation mean AUROC", out)


def _done(metrics: dict, key: str, label: str, out: Path) -> None:
    """The end of a training run: the epoch saved as best.pt, then the last one."""
    if metrics:
        best = metrics["best"]
        click.echo(f"done: best.pt = epoch {best['epoch']}, {label} {best.get(key, float('nan')):.3f}; "
                   f"last.pt = epoch {metrics['epoch']}, {metrics.get(key, float('nan')):.3f} -> {out}")


@main.command()
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path), required=True, multiple=True,
              help="best.pt or last.pt of a run, or the run folder (its best.pt); repeat for an ensemble (the "
                   "mean probability).")
@click.option("--data", type=click.Path(exists=True, path_type=Path), required=True, help="A `cxrcam prepare` cache.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="CSV to write.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True)
@device_option
def predict(checkpoint: tuple[Path, ...], data: Path, out: Path, batch_size: int, workers: int,
            device: str | None) -> None:
    """Write image-level finding probabilities of a trained classifier."""
    from cxrcam.files import write_csv
    from cxrcam.train.classifier import predict as run

    table = run(list(checkpoint), data, batch_size=batch_size, workers=workers, device=device or "auto")
    write_csv(out, table)
    click.echo(f"wrote probabilities of {len(table)} images -> {out}")


@main.command("train-detector")
@training_options("best.pt, last.pt, metrics.csv")
def train_detector(data: Path, out: Path, resume: bool, overwrite: bool, device: str | None, config: Config) -> None:
    """Train a torchvision Faster R-CNN (ResNet-50 FPN or timm + FPN) on a cache's boxes.

    \b
    Weak supervision: detector.pseudo_from=CLASSIFIER trains labelled images without boxes on its
    CAM pseudo-boxes (weight detector.pseudo_weight); detector.box_images=K keeps the boxes of K
    training images (none: of no image, the label-only detector); detector.cam_proposals_from=
    CLASSIFIER teaches the RoI heads to correct CAM boxes (then refine with refine.proposals=cam|both).
    cxrcam train-detector --data cache/vinbig512 --out runs/frcnn detector.init=runs/r50/best.pt
    cxrcam train-detector --data cache/nih512 --out runs/frcnn_nih detector.pseudo_from=runs/d121/best.pt \\
        detector.backbone=densenet121 detector.cam_proposals_from=runs/d121/best.pt
    """
    from cxrcam.train.detector import train_detector as run

    _set_device(config, device)
    _done(run(config, data, out, resume=resume, overwrite=overwrite), "val_map",
          f"validation mAP@{config.eval.iou_thr}", out)


def localize_options(func):
    """The input, output and heat map options localize and refine share."""
    options = [
        click.option("--data", type=click.Path(exists=True, path_type=Path), required=True,
                     help="A `cxrcam prepare` cache, a dataset folder as released, or any folder of DICOM/PNG/JPEG."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder."),
        click.option("--threshold", type=ThresholdParam(),
                     help="Heat map threshold for every class [config: boxes.threshold, 0.65], or the "
                          "calibration.json of `cxrcam calibrate`: a threshold per class [config: boxes.calibration]."),
        click.option("--method", help="CAM method: gradcam++, gradcam, xgradcam, eigencam, layercam, scorecam, ... "
                                      "[config: cam.method, gradcam++]."),
        click.option("--dataset", type=click.Choice([*SCHEMAS, PLAIN]),
                     help="Layout of a --data folder; default: recognised by its label table, else plain images."),
        click.option("--classes", help="Comma-separated class names or ids to localise and draw (default: the predicted)."),
        click.option("--no-images", is_flag=True, help="Skip the per-image pictures (faster)."),
        click.option("--picture-size", type=click.IntRange(min=64), default=512, show_default=True,
                     help="Long side of the pictures at least, in pixels (small model inputs are upsampled)."),
        click.option("--draw-min-score", type=click.FloatRange(0, 1),
                     help="Draw only boxes scored at least this; submission.csv keeps every box "
                          "[default: 0.1 for refine, 0 for localize]."),
        click.option("--batch-size", type=click.IntRange(min=1), help="Images per batch [config: cam.batch_size, 16]."),
    ]
    for option in reversed(options):
        func = option(func)
    return config_options(device_option(func))


def _localize(checkpoint: list[Path], detector: Path | None, data: Path, out: Path, threshold: float | Path | None,
              method: str | None, dataset: str | None, classes: str | None, no_images: bool, picture_size: int,
              draw_min_score: float | None, batch_size: int | None, device: str | None, config: Config,
              show_proposals: bool = False) -> None:
    from cxrcam.localize import localize as run

    _set_device(config, device)
    if isinstance(threshold, Path):
        config.boxes.calibration = str(threshold)
    elif threshold is not None:
        config.boxes.threshold = threshold
    if method is not None:
        config.cam.method = method
    if batch_size is not None:
        config.cam.batch_size = batch_size
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    if draw_min_score is None:  # a weak detector's boxes go down to 0.06: not worth a reader's look
        draw_min_score = REFINE_DRAW_MIN_SCORE if detector else 0.0
    summary = run(checkpoint if len(checkpoint) > 1 else checkpoint[0], data, out, config, dataset=dataset, classes=names, pictures=not no_images,
                  detector=detector, picture_size=picture_size, show_proposals=show_proposals,
                  draw_min_score=draw_min_score)
    if summary is None:
        return
    click.echo(f"{'refined' if detector else 'localized'} {summary.images} images ({summary.failed} failed) "
               f"-> {summary.boxes} boxes in {summary.seconds:.1f}s")
    if summary.truth_boxes:
        click.echo(f"truth boxes: {summary.truth_boxes}, mean IoU of the best prediction {summary.mean_iou:.3f}, "
                   f"hit (IoU > {config.eval.iou_thr}) {summary.hit_rate:.1%}; MaxBoxAccV2 {summary.maxboxacc:.3f} "
                   f"(random maps {summary.maxboxacc_control:.3f}, see maxboxacc.csv)")
    if summary.failed:
        click.echo(f"unreadable images listed in {out / 'failures.csv'}", err=True)
    click.echo(f"  submission: {out / 'submission.csv'}\n  boxes:      {out / 'bb_results.csv'}")
    if detector:
        click.echo(f"  CAM boxes:  {out / 'cam_submission.csv'}")


ENSEMBLE_HELP = ("Classifier best.pt/last.pt, or its run folder; repeat for an ensemble (probabilities and scaled "
                 "maps averaged over the checkpoints: each costs its own pass).")


@main.command()
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path), required=True, multiple=True,
              help=ENSEMBLE_HELP)
@localize_options
def localize(checkpoint: tuple[Path, ...], **kwargs) -> None:
    """Turn a classifier's heat maps into boxes, pictures, bb_results.csv and submission.csv.

    \b
    Writes to --out: original_/gtimage_/mask_/pred_<id>.png per image, bb_results.csv (each truth
    box with its best predicted box, IoU, IoBB, hit), submission.csv (VinBigData format, original
    pixels, "14 p_normal 0 0 1 1" appended), probabilities.csv, failures.csv.
    cxrcam localize --checkpoint runs/r50/best.pt --data cache/ --out loc/ --threshold 0.65
    torchrun --nproc_per_node 4 -m cxrcam localize ...   (rank 0 merges one submission.csv)
    cxrcam localize --checkpoint runs/s0 --checkpoint runs/s1 --checkpoint runs/s2 ...   (an ensemble)
    """
    _localize(list(checkpoint), None, **kwargs)


@main.command()
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path), required=True, multiple=True,
              help=ENSEMBLE_HELP + " An ensemble's operating points are chosen here too.")
@click.option("--data", type=click.Path(exists=True, path_type=Path), required=True,
              help="Boxed images: a `cxrcam prepare` cache (its validation fold by default) or a dataset folder.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("calibration.json"),
              show_default=True, help="The calibration file; its plots are written next to it.")
@click.option("--fold", type=click.Choice(["val", "all"]), default="val", show_default=True,
              help="val: the cache's validation fold (split.val_fold), never the images you score; all: every image.")
@click.option("--search", type=click.Choice(["threshold", "all"]), default="threshold", show_default=True,
              help="threshold: set each class's threshold; all: also its box score (mean/max/contrast/none) "
                   "and min_area where another does better.")
@click.option("--min-boxes", type=click.IntRange(min=1), default=5, show_default=True,
              help="A class with fewer truth boxes takes the threshold best for all classes together.")
@click.option("--maps", multiple=True, metavar="METHOD[@LAYER[,LAYER]]",
              help="A candidate heat map (repeat for several), tried beside the configured cam.method/target_layer: "
                   "e.g. --maps layercam@layer3 --maps layercam@layer3,layer4 (fused). Default: LayerCAM at the "
                   "backbone's next-to-last stage, alone and fused with the last; --maps none: the configured map only.")
@click.option("--modes", multiple=True, type=click.Choice(["fixed", "otsu", "peak", "percentile", "all"]),
              help="A threshold mode tried on each map beside the configured boxes.threshold_mode (repeat for several): "
                   "the map itself (fixed), Otsu's cut of each map, each region's own peak, the map's percentiles; all: "
                   "the four. Default: the configured one only (the others did not help: docs/BENCHMARKS.md).")
@click.option("--dataset", type=click.Choice(list(SCHEMAS)), help="Layout of a --data dataset folder.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per batch [config: cam.batch_size, 16].")
@device_option
@config_options
def calibrate(checkpoint: tuple[Path, ...], data: Path, out: Path, fold: str, search: str, min_boxes: int, maps: tuple[str, ...],
              modes: tuple[str, ...], dataset: str | None, batch_size: int | None, device: str | None,
              config: Config) -> None:
    """Choose the heat map and each class's threshold on a small boxed set, for `localize --threshold FILE`.

    \b
    For every candidate map (the configured one and --maps) the boxed images' maps are computed
    once; boxes are re-cut in each threshold mode (--modes) at every threshold from 0.05 to 0.95
    and scored with AP@0.4 per class (VinBigData's metric), on all images and on each half. A map
    and mode, a class's threshold, a class's own map (a finer candidate of the same method), or a
    class's box scale (0.6-1.5) replaces the configured one only where it wins on the half it was
    not chosen on (both ways), so a few boxes cannot be overfitted; the other box scores and min_area values are tried and reported.
    Also reports MaxBoxAccV2 (Choe et al., CVPR 2020) of each map beside its random-map control.
    Then the 2-class filter's thresholds on p(abnormal), scored with "No finding" counted (RSNA:
    its score), kept only where they beat no filter on both halves the same way.
    Writes the calibration file (localize, refine and pseudo-boxes then use its map and
    thresholds; localize, refine and ensemble its filter), <name>.png (AP against threshold per class) and <name>_box_accuracy.png.
    cxrcam calibrate --checkpoint runs/clf/best.pt --data cache/train --out calibration.json
    cxrcam localize --checkpoint runs/clf/best.pt --data cache/test --out loc/ --threshold calibration.json
    """
    from cxrcam.calibrate import calibrate as run
    from cxrcam.cam import map_name

    if batch_size is not None:
        config.cam.batch_size = batch_size
    _set_device(config, device)
    candidates = None if not maps else [] if list(maps) == ["none"] else list(maps)
    mode_list = ["fixed", "otsu", "peak", "percentile"] if "all" in modes else list(modes)
    result = run(list(checkpoint) if len(checkpoint) > 1 else checkpoint[0], data, out, config, dataset=dataset,
                 fold=fold, min_boxes=min_boxes, search=search,
                 maps=candidates, modes=mode_list)
    click.echo(f"calibrated on {result.images} images in {result.seconds:.0f}s -> {out}")
    click.echo(f"{'heat map, threshold mode':<44}  held-out AP (at {config.boxes.threshold} / calibrated)  "
               f"MaxBoxAccV2 (random maps)")
    key = ("method", "target_layer", "threshold_mode")
    for m in result.maps:
        name = f"{map_name(m['method'], m['target_layer'])}, {m['threshold_mode']}"
        mark = " <- chosen" if all(m[k] == result.chosen[k] for k in key) else ""
        click.echo(f"{name:<44}  {_f3(m['heldout_ap_default'])} / {_f3(m['heldout_ap'])}"
                   f"{'':<22}{_f3(m['maxboxacc'])} ({_f3(m['control'])}){mark}")
    if any(_f3(m["heldout_ap"]) == "-" for m in result.maps):
        click.echo("(-: undefined, no class has truth boxes in both halves of the calibration images)")
    click.echo(f"map: {result.chosen['why']}")
    width = max(len(n) for n in result.classes)
    click.echo(f"{'class':<{width}}  boxes  threshold  scale  AP@{config.eval.iou_thr} (at {config.boxes.threshold})  "
               f"better setting")
    for name, e in result.classes.items():
        best = e["best_setting"]
        better = (f"score={best['score']} min_area={best['min_area']} t={best['threshold']:.2f}: AP {_f3(best['ap'])}"
                  if best["ap"] > e["ap"] + 1e-9 else "-")
        note = {"class": "", "all classes": " (too few boxes: shared)"}.get(e["source"], " (kept: no held-out gain)")
        click.echo(f"{name:<{width}}  {e['n_truth']:5d}  {e['threshold']:9.2f}  {e['scale']:5.3g}  {_f3(e['ap'])} "
                   f"({_f3(e['ap_default'])})  {better}{note}")
    if result.filter is not None:
        f = result.filter
        click.echo(f"2-class filter: low {f['low']}, high {f['high']} ({f['metric']} {_f3(f['value'])}, no filter "
                   f"{_f3(f['off'])}; {f['why']})")
    click.echo(f"mean AP over the calibrated classes: {_f3(result.mean_ap)} (at {config.boxes.threshold}: "
               f"{_f3(result.mean_ap_default)}; chosen on these images, so optimistic)")
    click.echo(f"MaxBoxAccV2 of the chosen map {_f3(result.maxboxacc)} (random maps {_f3(result.maxboxacc_control)})")


def _f3(value: float | None) -> str:
    """A figure to 3 places; "-" where it is undefined (None or NaN), never "nan"."""
    return "-" if value is None or value != value else f"{value:.3f}"


@main.command()
@click.option("--classifier", type=click.Path(exists=True, path_type=Path), required=True, multiple=True,
              help=ENSEMBLE_HELP)
@click.option("--detector", type=click.Path(exists=True, path_type=Path), required=True,
              help="`train-detector` best.pt/last.pt, or its run folder.")
@click.option("--show-proposals", is_flag=True, help="Draw the CAM proposals, faint, under the detections in pred_.")
@localize_options
def refine(classifier: tuple[Path, ...], detector: Path, show_proposals: bool, **kwargs) -> None:
    """Refine the CAM boxes with a Faster R-CNN: localize's outputs, with detections in submission.csv.

    \b
    The CAM proposals of the predicted classes join the RPN's proposals in the detector's RoI heads
    (refine.proposals=both; cam: they alone; rpn: none), which classify and regress them; scores are
    multiplied by the classifier's probabilities (refine.gate), merged per class (refine.fusion
    nms|wbf) and the refine.top_k best kept. Writes what localize writes, with submission.csv and
    bb_results.csv from the refined boxes and cam_submission.csv from the CAM boxes; pictures show
    the refined detections (--show-proposals: the CAM boxes too). refine.proposals=rpn refine.gate=none
    is the plain detector.
    cxrcam refine --classifier runs/clf/best.pt --detector runs/det/best.pt --data cache/ --out refined/
    """
    _localize(list(classifier), detector, show_proposals=show_proposals, **kwargs)


@main.command()
@click.option("--pred", type=click.Path(exists=True, path_type=Path), required=True, multiple=True,
              help="submission.csv, or a localize/refine output folder (adds probabilities.csv, bb_results.csv). "
                   "Several --pred: a paired comparison on the same bootstrap resamples.")
@click.option("--gt", type=click.Path(exists=True, path_type=Path), required=True,
              help="Truth: a cache, a dataset folder, VinBigData train.csv, NIH BBox_List_2017.csv or RSNA labels.")
@click.option("--format", "fmt", type=click.Choice(["vinbig", "rsna", "coco"]), default="vinbig", show_default=True,
              help="vinbig: VOC 2010 mAP@0.4 with No finding; coco: adds COCO AP (pycocotools); rsna: the RSNA score.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write metrics here.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for metrics.json/.md, localization.csv, ap_per_class.png, pr_curves.png "
                   "(comparison.json/.md/.png with several --pred); without it only --json is written.")
@click.option("--probs", type=click.Path(exists=True, path_type=Path), help="probabilities.csv for per-class AUROC.")
@click.option("--lenient", is_flag=True, help="Skip malformed submission rows with a warning instead of stopping.")
@click.option("--no-control", is_flag=True, help="Skip the random heat map control of the localisation table.")
@click.option("--no-plots", is_flag=True, help="Write no PNG plots (matplotlib takes about 2 s of a 3,000-image run).")
@click.option("--ci", is_flag=True, help="95% bootstrap interval of every headline figure (resampling images).")
@click.option("--bootstrap", "resamples", type=click.IntRange(min=10), default=1000, show_default=True,
              help="Resamples for --ci and comparisons.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the resamples.")
@config_options
def evaluate(pred: tuple[Path, ...], gt: Path, fmt: str, json_path: Path | None, out: Path | None,
             probs: Path | None, lenient: bool, no_control: bool, no_plots: bool, ci: bool, resamples: int, seed: int,
             config: Config) -> None:
    """Score predictions with the competition metrics (VOC mAP@0.4, COCO, RSNA, ChestX-ray8, AUROC).

    \b
    cxrcam evaluate --pred loc/ --gt cache/vinbig512 --json loc/metrics.json
    cxrcam evaluate --pred loc/ --gt cache/vinbig512 --ci              # 95% intervals, 1000 resamples
    cxrcam evaluate --pred refine/ --pred loc/ --gt cache/vinbig512 --out cmp/   # paired comparison
    cxrcam evaluate --pred submission.csv --gt train.csv --format coco --json m.json fusion.method=reader
    """
    import warnings

    from cxrcam.files import write_json

    folder = out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if len(pred) > 1:
            from cxrcam.evaluation.compare import compare, markdown

            if probs is not None:
                warnings.warn(f"--probs {probs} is not used with several --pred: each localize folder's own "
                              f"probabilities.csv gives its AUROC", stacklevel=1)
            result = compare(list(pred), gt, fmt, config, lenient=lenient, out=folder, resamples=resamples, seed=seed,
                             plots=not no_plots)
        else:
            from cxrcam.evaluation.evaluate import evaluate as run
            from cxrcam.evaluation.evaluate import markdown

            result = run(pred[0], gt, fmt, config, probs=probs, lenient=lenient, out=folder, control=not no_control,
                         plots=not no_plots, bootstrap=resamples if ci else 0, seed=seed)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    if json_path is not None:
        write_json(json_path, result)
    click.echo(markdown(result))
    if folder is not None:
        click.echo(f"{'comparison' if len(pred) > 1 else 'metrics'}, table{'' if no_plots else ' and plots'} -> {folder}")


@main.command()
@click.argument("submissions", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", type=click.Path(exists=True, path_type=Path), required=True,
              help="The images' truth or cache (as evaluate --gt reads it): each image's size, to normalise its boxes.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The fused submission.")
@click.option("--weights", type=float, multiple=True, help="One per submission, in order (default: equal).")
@click.option("--iou", type=click.FloatRange(0, 1), default=0.4, show_default=True,
              help="WBF's IoU: boxes of one class overlapping more are fused (VinBigData's winners: 0.33-0.4).")
@click.option("--skip", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="WBF's skip_box_thr: boxes scored below it are left out.")
@click.option("--conf-type", type=click.Choice(WBF_CONF_TYPES), default="avg", show_default=True,
              help="WBF's conf_type, how a fused box is scored: avg (the mean, scaled by the share of models that "
                   "found it), max, box_and_model_avg, absent_model_aware_avg.")
@click.option("--filter-low", type=click.FloatRange(0, 1), default=None,
              help="2-class filter: an image with p(abnormal) = 1 - p_normal below this keeps its \"No finding\" row "
                   "alone (RSNA: no box) [as boxes.filter_low; the VinBigData winners used 0.08; default: "
                   "--calibration's, else 0].")
@click.option("--filter-high", type=click.FloatRange(0, 1), default=None,
              help="... and one above this its detections alone [as boxes.filter_high; 0.95; default: "
                   "--calibration's, else 1].")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A calibration.json of `cxrcam calibrate`: the 2-class filter thresholds it chose on its "
                   "validation images.")
def ensemble(submissions: tuple[Path, ...], data: Path, out: Path, weights: tuple[float, ...], iou: float,
             skip: float, conf_type: str, filter_low: float | None, filter_high: float | None,
             calibration: Path | None) -> None:
    """Fuse several submissions of the same images with Weighted Boxes Fusion (ensemble-boxes).

    \b
    VinBigData or RSNA format, read from the header; the "No finding" rows' p_normal is the weighted
    mean; then the 2-class filter (off unless asked, or chosen by --calibration).
    cxrcam ensemble refine/submission.csv plain/submission.csv --data cache/test --out fused.csv
    cxrcam ensemble a.csv b.csv --data cache/test --out fused.csv --weights 2 --weights 1 --filter-low 0.08
    cxrcam ensemble a.csv b.csv --data cache/test --out fused.csv --calibration calibration.json
    """
    from cxrcam.calibration import CalibrationFile, filter_range
    from cxrcam.config import BoxConfig
    from cxrcam.evaluation.evaluate import read_ground_truth
    from cxrcam.outputs.postprocess import write_ensemble
    from cxrcam.data.tables import read_table

    truth = read_ground_truth(data)
    for path in submissions:
        rsna = "patientId" in read_table(path, nrows=0).columns
        if rsna != (truth.schema.name == "rsna"):
            raise CxrcamError(f"{path} is a{' RSNA' if rsna else ' VinBigData-format'} submission; {data} holds "
                              f"{truth.schema.name} images")
    chosen = CalibrationFile.read(calibration) if calibration else None
    if chosen is not None:
        chosen.check_schema(truth.schema)
    low, high = filter_range(BoxConfig(filter_low="auto" if filter_low is None else filter_low,
                                       filter_high="auto" if filter_high is None else filter_high), chosen)
    table = write_ensemble(list(submissions), truth.sizes, out, truth.schema, list(weights) or None, iou, skip,
                           low, high, conf_type)
    click.echo(f"fused {len(submissions)} submissions of {len(table)} images -> {out}")


@main.command()
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder to report on: a demo/bench folder, or any folder holding caches, runs, localize/evaluate outputs.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="HTML file to write.")
@click.option("--embed", is_flag=True, help="Embed the gallery pictures too (one file to send; larger).")
@click.option("--max-pictures", type=click.IntRange(min=1), default=300, show_default=True,
              help="Gallery images per localize/refine folder (images with truth boxes first).")
def report(run_dir: Path, out: Path, embed: bool, max_pictures: int) -> None:
    """One HTML page of a run: dataset overview, training curves, per-class metrics, PR curves and a
    gallery of gtimage_/pred_ pictures filtered by class and hit/miss.

    \b
    cxrcam report --run demo --out demo/report.html
    """
    from cxrcam.outputs.report import write_report

    path = write_report(run_dir, out, embed, max_pictures)
    click.echo(f"report -> {path} ({path.stat().st_size / 1e6:.1f} MB); open it in a browser")


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"), show_default=True)
@click.option("--n-images", type=click.IntRange(min=20), default=600, show_default=True,
              help="Synthetic training images (a fifth of them validate).")
@click.option("--n-test", type=click.IntRange(min=10), default=200, show_default=True,
              help="Held-out synthetic test images (another seed), where every figure is measured.")
@click.option("--size", type=click.IntRange(min=64), default=128, show_default=True, help="Cached image side.")
@click.option("--epochs", type=click.IntRange(min=1), default=8, show_default=True,
              help="Classifier epochs (on the tables' world the best validation epoch came at 6 of 10).")
@click.option("--detector-epochs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Faster R-CNN epochs (the slowest stage on a CPU).")
@click.option("--model", default="resnet10t", show_default=True, help="timm name of the classifier and detector backbone.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--normal-fraction", type=click.FloatRange(0, 1),
              help="Share of normal images in both synthetic sets [the profile's: 0.707, VinBigData's].")
@click.option("--profile", type=click.Choice(["vinbig", "uniform"]), default="vinbig", show_default=True,
              help="vinbig: drawn from VinBigData's released table; uniform: the earlier flat generator.")
@click.option("--backgrounds", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Normal radiographs to insert the findings into (synth --backgrounds); the test set's are unseen.")
@click.argument("overrides", nargs=-1)
def demo(out: Path, n_images: int, n_test: int, size: int, epochs: int, detector_epochs: int, model: str, seed: int,
         normal_fraction: float | None, profile: str, backgrounds: Path | None, overrides: tuple[str, ...]) -> None:
    """Run the whole pipeline on built-in synthetic data (offline; about 6 minutes on 2 idle CPU cores).

    \b
    Every stage is the real command, printed before it runs: synth (train + held-out test set, drawn
    from VinBigData's released table),
    prepare, train-classifier, calibrate (per-class thresholds on the validation fold), localize
    --threshold 0.65 and --threshold calibration.json, train-detector (from the classifier's
    weights), refine (the calibrated CAM proposals join the detector's), evaluate, report. Ends with
    the tables (classifier AUROC, CAM-only and refined mAP@0.4, CAM localisation beside its
    random-map control) and the file to open first. Larger on a GPU:
    cxrcam demo --out demo512 --size 512 --n-images 2000 --epochs 20 --detector-epochs 12 --model resnet50
    """
    from cxrcam.demo import PipelineSettings, run_command, run_pipeline, summary_table

    summary = run_pipeline(main, PipelineSettings(out, n_images, size, epochs, detector_epochs, seed, model,
                                                  overrides=list(overrides), n_test=n_test,
                                                  normal_fraction=normal_fraction, profile=profile,
                                                  backgrounds=backgrounds))
    report = out / "report.html"
    run_command(main, "report", "--run", out, "--out", report)
    click.echo(f"\ndemo finished in {summary['seconds'] / 60:.1f} min; every figure is on the {n_test} held-out "
               f"test images\n")
    click.echo(summary_table(summary))
    click.echo("")
    for name, path in summary["paths"].items():
        click.echo(f"  {name + ':':<18} {path}")
    click.echo(f"\nopen first: {report} (summary, per-class metrics, then the pictures)")


def run_in_process(args: list[str]) -> int:
    """Run ``cxrcam ARGS`` in this process, as the console script would; its exit status
    (:func:`cxrcam.runtime.inprocess.run_in_process`)."""
    from cxrcam.runtime.inprocess import run_in_process as run

    return run(main, args)

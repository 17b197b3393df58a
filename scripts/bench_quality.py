"""Quality benchmark: the whole pipeline on a synthetic train set, scored on a held-out test set.

Fixed seeds; the test set is synthesized with another seed, so no test image is seen in
training. Prints and writes (``--out``/summary.json, summary.md) the per-class AUROC, the mAP@0.4
of CAM-only (threshold 0.65 and calibrated on the training cache's validation fold), refined and
plain-detector submissions, and the CAM figures (findings mAP, MaxBoxAccV2, T(IoU), T(IoBB),
pointing game) beside their random-map controls.

    python scripts/bench_quality.py --out /tmp/bench_quality                      # CPU, ~40 min
    python scripts/bench_quality.py --out /tmp/cam16 --cam-only --n-images 800 model.output_stride=16
    python scripts/bench_quality.py --out /tmp/scarce --detector-epochs 16 \\
        detector.box_images=100 detector.step_size=12     # boxes on 100 images, labels on all
    python scripts/bench_quality.py --out q512 --size 512 --model resnet50 \\
        --config configs/resnet50.yaml --n-images 2000 --epochs 20 --detector-epochs 12   # GPU
"""
from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

from cxrcam.cli import main as cli
from cxrcam.demo import TINY, PipelineSettings, bench_parser, run_pipeline, summary_table


def main() -> None:
    parser = bench_parser(__doc__, n_images=400, n_test=0, epochs=15,
                          n_test_help="held-out test images (default: n-images / 2)")
    parser.add_argument("--detector-epochs", type=int, default=8)
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--config", type=Path, default=TINY)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cam-only", action="store_true", help="stop after the CAM rows (no detector)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the data, caches and classifier already in --out (re-run the later stages)")
    parser.add_argument("--cam-proposals", action="store_true",
                        help="also train the detector's RoI heads on the calibrated CAM proposals "
                             "(detector.cam_proposals_from; the demo ran so in issue 16's first measurement)")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every stage")
    a = parser.parse_args()
    summary = run_pipeline(cli, PipelineSettings(a.out, a.n_images, a.size, a.epochs, a.detector_epochs, a.seed, a.model,
                                            a.config, a.overrides, plain=True, pictures=False, n_test=a.n_test,
                                            cam_only=a.cam_only, reuse=a.reuse, cam_proposals=a.cam_proposals))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    lines = [f"command: {' '.join(sys.argv)}", f"device: {device}, torch {torch.__version__}",
             f"pipeline time: {summary['seconds'] / 60:.1f} min", "", summary_table(summary), "",
             f"per-class AUROC / AP@0.4 ({', '.join(summary['ap'])}):"]
    def fmt(v) -> str:
        return "  -  " if v is None else f"{v:.3f}"

    for name, auroc in summary["auroc"].items():
        aps = " ".join(fmt(summary["ap"][k].get(name)) for k in summary["ap"])
        lines.append(f"  {name:<20} {fmt(auroc)}   {aps}")
    text = "\n".join(lines)
    (a.out / "summary.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()

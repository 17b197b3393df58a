"""Benchmark: heat maps of a batch against a plain forward pass of the same batch, per target layer.

Per model and target layer, every figure a ratio to the forward pass, timed in turn in one run
(same batch, same device; medians after a warm-up):

  at the pooling's input (``--layers ''``, the default layer):
    fast      the closed form (Grad-CAM++, all classes) from a reusable ``create_cam`` engine
    call      the one-call API ``compute_cams(model, images)``: engine and probe pass included
              (issue 25: 1.64x before the probe ran on one 64 px image)
  at any other layer (LayerCAM; Grad-CAM and Grad-CAM++ cost the same), the gradient engine:
    all       all ``--classes`` maps: one batched backward (is_grads_batched), or one per class
    needed    the ``--needed`` classes a localize batch typically asks for, both ways
  library     pytorch-grad-cam, one forward + backward per class, all classes (``--library``)

Goals (issue 25, 26): fast and call <= 1.15x; all 14 classes at layer3 <= 6x (library ~30x);
localize's classes <= 2.5x, for resnet50 and resnet10t. ``cxrcam.cam.gradients.BATCHED`` takes the
faster backward of each device from this table.

    python scripts/bench_cam.py --models resnet50 resnet10t --size 384 --batch 4 --layers '' layer3 layer2 layer3,layer4
    python scripts/bench_cam.py --models resnet50 densenet121 --size 384 --batch 4 --repeats 5   # the one-call row
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cxrcam.cam import GradientCAM, LibraryCAM, compute_cams, create_cam  # noqa: E402
from cxrcam.models import create_classifier  # noqa: E402


def timed_together(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each function, run in turn ``repeats`` times after one warm-up each, so
    that a machine's slow spell falls on all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(model, images, layer: str, n_classes: int, needed: int, repeats: int, library: bool,
            device: torch.device) -> dict[str, float]:
    """Seconds of each way to the maps of ``layer`` ('' = the pooling's input), and the largest
    difference from pytorch-grad-cam when ``library``."""
    every, few = list(range(n_classes)), list(range(needed))

    def forward():
        with torch.no_grad():
            model(images)

    fns = {"forward": forward}
    method = "gradcam++" if not layer else "layercam"
    if not layer:
        fast = create_cam(model, method)
        fns |= {"fast": lambda: fast(images, every).cams, "call": lambda: compute_cams(model, images)}
    else:
        for batched in (True, False):
            engine = GradientCAM(model, method, layer, batched=batched)
            key = "batched" if batched else "loop"
            fns |= {f"all {key}": lambda e=engine: e(images, every).cams,
                    f"needed {key}": lambda e=engine: e(images, few).cams}
    t = timed_together(fns, repeats, device)
    if library:
        ours = (fns["fast"] if not layer else fns["all batched"])().cpu().numpy()
        lib = LibraryCAM(model, method, layer or None)  # its hooks stay on the model until released
        t["library"] = timed_together({"library": lambda: lib(images, every)}, 1, device)["library"]
        t["diff"] = float(np.abs(ours - lib(images, every).cams.cpu().numpy()).max())
        lib.engine.activations_and_grads.release()
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "densenet121"])
    parser.add_argument("--layers", nargs="+", default=[""], help="'' = the pooling's input; module names, or a,b fused")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--needed", type=int, default=3, help="classes a localize batch asks for")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stride", type=int, default=32, choices=[8, 16, 32], help="model.output_stride")
    parser.add_argument("--library", action="store_true", help="also time pytorch-grad-cam (minutes on a CPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'} x{os.cpu_count()}"
    print(f"device {name}, torch {torch.__version__}, batch {args.batch} x 1 x {args.size}^2, {args.classes} classes, "
          f"{args.needed} needed, output stride {args.stride}\n")
    cols = ["fast", "call", "all batched", "all loop", "needed batched", "needed loop", "library"]
    print("| model | layer | forward s | " + " | ".join(f"{c} / fwd" for c in cols) + " | max diff |")
    print("|---|---|---|" + "---|" * (len(cols) + 1))
    torch.manual_seed(0)
    images = torch.rand(args.batch, 1, args.size, args.size, device=device)
    for model_name in args.models:
        model = create_classifier(model_name, args.classes, output_stride=args.stride).to(device).eval()
        for layer in args.layers:
            t = measure(model, images, layer, args.classes, args.needed, args.repeats, args.library, device)
            cells = [f"{t[c] / t['forward']:.2f}" if c in t else "-" for c in cols]
            diff = f"{t['diff']:.1e}" if "diff" in t else "-"
            print(f"| {model_name} | {layer or '(pool input)'} | {t['forward']:.3f} | " + " | ".join(cells)
                  + f" | {diff} |", flush=True)


if __name__ == "__main__":
    main()

"""Benchmark: heat maps for all 14 classes vs a plain forward pass of the same batch.

Four timings per model, side by side in one run (same batch, same device):
  forward  plain inference forward pass (the physical floor: the maps need its activations)
  fast     cxrcam's closed-form Grad-CAM++ from a reusable engine (``create_cam`` once, then
           ``cam(images)``): all 14 maps at input resolution, min-max scaled
  call     the one-call API ``compute_cams(model, images)``: the engine built for every call,
           its probe pass included (issue 25: 1.64x before the probe ran on one 64 px image)
  library  pytorch-grad-cam GradCAMPlusPlus, one call (forward + backward) per class
Goal: fast and call <= 1.15 x forward; library is about 15 x or more.
With ``--strides 32 16 8`` each model also runs dilated (``model.output_stride``): the forward
cost against stride 32 (fwd/os32) and the maps' cost against that forward; the library is
timed at stride 32 only.

    python scripts/bench_cam.py [--models resnet50 densenet121] [--size 256] [--batch 8] [--repeats 3]
    python scripts/bench_cam.py --size 384 --batch 4 --repeats 5 --no-library   # the one-call row
    python scripts/bench_cam.py --models resnet50 --strides 32 16 8
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
import torch  # noqa: E402
from pytorch_grad_cam import GradCAMPlusPlus  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from cxrcam.cam import compute_cams, create_cam  # noqa: E402
from cxrcam.errors import CxrcamError  # noqa: E402
from cxrcam.models import create_classifier  # noqa: E402


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "densenet121"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--strides", type=int, nargs="+", default=[32], choices=[8, 16, 32])
    parser.add_argument("--no-library", action="store_true", help="skip pytorch-grad-cam (minutes on a CPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'} x{os.cpu_count()}"
    print(f"device {name}, torch {torch.__version__}, batch {args.batch} x 1 x {args.size}^2, {args.classes} classes")
    print(f"{'model':<14}{'stride':>7}{'forward s':>11}{'fwd/os32':>10}{'fast s':>9}{'call s':>9}{'library s':>11}"
          f"{'fast/fwd':>10}{'call/fwd':>10}{'library/fwd':>13}{'max |diff|':>12}")
    torch.manual_seed(0)
    images = torch.rand(args.batch, 1, args.size, args.size, device=device)
    classes = list(range(args.classes))
    for model_name in args.models:
        base = None
        for stride in args.strides:
            try:
                model = create_classifier(model_name, args.classes, output_stride=stride).to(device).eval()
            except CxrcamError as exc:
                print(f"{model_name:<14}{stride:>7}  {exc}")
                continue
            t_fwd, t_fast, t_call, t_lib, diff = measure(model, images, classes, args.repeats, device,
                                                         library=stride == 32 and not args.no_library)
            base = base or (t_fwd if stride == 32 else None)
            ratio = f"{t_fwd / base:>10.2f}" if base else f"{'-':>10}"
            lib = (f"{t_lib:>11.2f}", f"{t_lib / t_fwd:>13.1f}", f"{diff:>12.1e}") if t_lib else (f"{'-':>11}",) * 2 + (
                f"{'-':>12}",)
            print(f"{model_name:<14}{stride:>7}{t_fwd:>11.3f}{ratio}{t_fast:>9.3f}{t_call:>9.3f}{lib[0]}"
                  f"{t_fast / t_fwd:>10.2f}{t_call / t_fwd:>10.2f}{lib[1]}{lib[2]}")


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


def measure(model, images, classes, repeats, device, library: bool):
    """(forward s, fast maps s, one-call s, library s or None, max |fast - library|)."""
    cam = create_cam(model, "gradcam++")

    def forward():
        with torch.no_grad():
            model(images)

    def fast():
        return cam(images, classes).cams

    t = timed_together({"forward": forward, "fast": fast, "call": lambda: compute_cams(model, images)},
                       repeats, device)
    t_fwd, t_fast, t_call = t["forward"], t["fast"], t["call"]
    if not library:
        return t_fwd, t_fast, t_call, None, None
    engine = GradCAMPlusPlus(model=model, target_layers=[model.get_submodule(cam.target_name)])

    def slow():
        return [engine(input_tensor=images, targets=[ClassifierOutputTarget(c)] * len(images)) for c in classes]

    t_lib = timed(slow, max(1, repeats // 3), device)
    diff = (fast().cpu() - torch.from_numpy(__import__("numpy").stack(slow(), 1))).abs().max().item()
    return t_fwd, t_fast, t_call, t_lib, diff

if __name__ == "__main__":
    main()

"""Time ``boxes.components`` (what ``cxrcam calibrate`` computes for every map) against a loop
per component, the definition the tests check it by, on smooth random maps of several sizes.

    python scripts/bench_components.py [--sides 64 128 256 512] [--repeats 5]

Both run in this process on the same maps, alternating, so the ratio is from one run.
Results: docs/BENCHMARKS.md, "Test suite time".
"""
from __future__ import annotations

import argparse
import time

import cv2
import numpy as np

from cxrcam.boxes import components
from cxrcam.calibrate.sweep import SWEEP


def per_component(cam: np.ndarray, thresholds) -> list:
    """The definition: for each threshold and 8-connected component, its extent, mean and peak."""
    rows = []
    for k, t in enumerate(thresholds):
        n, labels = cv2.connectedComponents((cam >= t).astype(np.uint8), connectivity=8)
        for i in range(1, n):
            inside = cam[labels == i]
            ys, xs = np.nonzero(labels == i)
            rows.append((k, xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, inside.mean(), inside.max()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| map side | components() ms | loop per component ms | ratio | components per map |")
    print("|---|---|---|---|---|")
    for side in args.sides:
        grid = max(2, side // 32)  # a stride-32 map upsampled to the input, as localize cuts it
        cam = cv2.resize(rng.random((grid, grid)).astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
        cam = (cam - cam.min()) / np.ptp(cam)
        ours, loop = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            found = components(cam, SWEEP)
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            per_component(cam, SWEEP)
            loop.append(time.perf_counter() - start)
        a, b = 1000 * np.median(ours), 1000 * np.median(loop)
        print(f"| {side} | {a:.1f} | {b:.1f} | {b / a:.1f}x | {len(found)} |", flush=True)


if __name__ == "__main__":
    main()

"""What the default heat maps cost: ``localize --no-images`` with the configured maps against the
closed-form Grad-CAM++ at the last layer, on the same classifier and test set, timed in turn in
one run (the cost goal of issue 36: at most 2x).

The configured map (the tiny config: LayerCAM at layer3) needs gradients; each image gets the
maps of its own needed classes (its predicted classes and its truth classes, for the pointing
game and MaxBoxAccV2), one backward pass per round of pairs (``BaseCAM.pairs``). The closed form
needs no backward at all. ``--checkpoint`` and ``--data``: a classifier and its test cache (the
demo's: ``demo/runs/classifier/best.pt`` and ``demo/cache/test``).

    python scripts/bench_localize_cost.py --checkpoint demo/runs/classifier/best.pt --data demo/cache/test \\
        --out /tmp/cost --repeats 3
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

from cxrcam.cli import main as cli
from cxrcam.demo import TINY, run_command

ROWS = {"closed-form Grad-CAM++, last layer": ["cam.method=gradcam++", "cam.target_layer="],
        "configured maps (tiny config)": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default=TINY)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--row", action="append", default=[], metavar="'NAME=section.key=value ...'",
                        help="another row: a name, then its overrides")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every row")
    a = parser.parse_args()
    rows = dict(ROWS)
    for text in a.row:
        name, _, settings = text.partition("=")
        rows[name] = settings.split()
    seconds: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(a.repeats):  # in turn, so a slow spell of the machine falls on every row
        for k, (name, settings) in enumerate(rows.items()):
            start = time.perf_counter()
            run_command(cli, "localize", "--checkpoint", a.checkpoint, "--data", a.data, "--out", a.out / f"row{k}",
                        "--no-images", "--threshold", 0.65, "--config", a.config, *a.overrides, *settings)
            seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds[next(iter(rows))])
    lines = [f"command: {' '.join(sys.argv)}", f"machine: {platform.machine()}, {platform.processor() or 'cpu'}", "",
             "| maps | seconds (median of runs) | ratio to the closed form |", "|---|---|---|"]
    lines += [f"| {name} | {statistics.median(s):.1f} ({', '.join(f'{v:.1f}' for v in s)}) | "
              f"{statistics.median(s) / base:.2f}x |" for name, s in seconds.items()]
    text = "\n".join(lines)
    (a.out / "cost.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()

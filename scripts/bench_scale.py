"""Scale rehearsal (issue 25): a VinBigData-shaped set (70% normal images) through every stage, as
a user runs it overnight, with what each stage costs.

Two synthetic sets of one seed: ``--n-images`` (default 3,000) and its first ``--small`` (750;
synth draws each image from its own seed, so the small set is the large one's head). Both are
prepared at ``--size`` px; the classifier (``--epochs``) and the detector (1 epoch) train on the
large cache, calibrate runs on its validation fold; localize (with and without pictures), refine,
evaluate and report run on both caches, so that their peak memory at ``--n-images`` can be set
against ``--small``. Every stage is the real ``cxrcam`` command in a fresh process.

Per stage: wall seconds, seconds per image, peak RSS of the command's own process (``wait4``:
exact) and of its whole process tree (DataLoader / prepare workers included; /proc sampled every
0.2 s, shared pages counted once per process), and the bytes the stage added to its output.

    python scripts/bench_scale.py --out /tmp/scale                # 3,000 + 750 images, 256 px
    python scripts/bench_scale.py --out /tmp/scale_q --n-images 200 --small 50 --size 128   # a quick try
    python scripts/bench_scale.py --out /tmp/scale --reuse    # again from calibrate on: the data, caches
                                                              # and trainings of the last run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from cxrcam.demo import TINY, Stages


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and every descendant (read from /proc; 0 for a finished one)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    family, grew = {pid}, True
    while grew:
        more = {p for p, parent in parents.items() if parent in family} - family
        family |= more
        grew = bool(more)
    total = 0
    for p in family:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run_stage(name: str, args: list, images: int, out: Path, log: Path) -> dict:
    """Run ``cxrcam ARGS`` in a fresh process; its costs."""
    before = folder_bytes(out)
    cmd = [sys.executable, "-m", "cxrcam", *map(str, args)]
    print(f"\n[{name}] $ cxrcam {' '.join(map(str, args))}", flush=True)
    start = time.perf_counter()
    with open(log, "a") as sink:
        sink.write(f"\n$ {' '.join(cmd)}\n")
        sink.flush()
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        peak = [0]

        def sample():
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_rss(proc.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.join()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"stage {name} failed (exit {proc.returncode}); see {log}")
    row = {"stage": name, "images": images, "seconds": round(seconds, 1),
           "s_per_image": round(seconds / max(images, 1), 4), "peak_rss_mb": round(usage.ru_maxrss / 1024, 0),
           "tree_rss_mb": round(peak[0] / 2**20, 0), "written_mb": round((folder_bytes(out) - before) / 2**20, 1)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n-images", type=int, default=3000)
    parser.add_argument("--small", type=int, default=750)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--reuse", action="store_true",
                        help="keep the data, caches and trainings of the last run in --out (their rows too)")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every stage")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "stages.log"
    stages = Stages(out, args.size, TINY, args.overrides)  # every stage's command line, as the demo writes it
    rows = []
    earlier = {r["stage"]: r for r in json.loads((out / "scale.json").read_text())["rows"]} if args.reuse else {}
    kept = ("synth", "prepare", "train-classifier", "train-detector")

    def stage(name, cmd, images, target):
        if name.startswith(kept) and name in earlier:
            rows.append({**earlier[name], "reused": True})
            return
        if target.is_dir():  # a fresh output, so that "written" is what this run wrote (a rerun replaces files)
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        rows.append(run_stage(name, cmd, images, target, log))
        (out / "scale.json").write_text(json.dumps({"machine": machine(), "args": vars(args) | {"out": str(out)},
                                                    "rows": rows}, indent=2, default=str))

    sets = {"large": args.n_images, "small": args.small}
    for key, n in sets.items():
        stage(f"synth {key}", stages.synth(key, n, args.seed, "--normal-fraction", 0.7), n, stages.data(key))
        stage(f"prepare {key}", stages.prepare(key), n, stages.cache(key))
    import pandas as pd

    n_val = int((pd.read_csv(stages.cache("large") / "manifest.csv")["fold"] == 0).sum())  # split.val_fold: 0
    stage("train-classifier", stages.train_classifier(f"train.epochs={args.epochs}", data="large"),
          args.n_images * args.epochs, stages.classifier.parent)
    stage("calibrate", stages.calibrate(data="large"), n_val, stages.calibration)
    stage("train-detector", stages.train_detector("detector.epochs=1", "detector.backbone=resnet10t", data="large"),
          args.n_images, stages.detector.parent)
    calibrated = ["--threshold", stages.calibration]
    for key, n in sets.items():
        for name, folder, cmd in (
                (f"localize {key}", out / f"loc_{key}", stages.localize),
                (f"localize --no-images {key}", out / f"loc_noimg_{key}", stages.localize),
                (f"refine --no-images {key}", out / f"refine_{key}", stages.refine)):
            no_images = ["--no-images"] if "--no-images" in name else []
            stage(name, cmd(folder, *calibrated, *no_images, data=key), n, folder)
        for kind, folder in (("localize", out / f"loc_{key}"), ("refine", out / f"refine_{key}")):
            stage(f"evaluate {kind} {key}", stages.evaluate(folder, folder / "eval", gt=key), n, folder / "eval")
    report = out / "report.html"
    stage("report", ["report", "--run", out, "--out", report], args.n_images + args.small, report)
    print_table(rows, args)


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"


def print_table(rows: list[dict], args) -> None:
    print(f"\n{machine()}; {args.n_images} + {args.small} images at {args.size} px\n")
    print("| stage | images | s | s / image | peak RSS MB (process) | peak RSS MB (tree) | written MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['images']} | {r['seconds']} | {r['s_per_image']} | {r['peak_rss_mb']:.0f} | "
              f"{r['tree_rss_mb']:.0f} | {r['written_mb']} |")
    by = {r["stage"]: r for r in rows}
    print("\npeak RSS (process), large / small:")
    for name in ("localize", "localize --no-images", "refine --no-images", "evaluate localize", "evaluate refine"):
        big, small = by.get(f"{name} large"), by.get(f"{name} small")
        if big and small:
            print(f"  {name}: {big['peak_rss_mb'] / small['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()

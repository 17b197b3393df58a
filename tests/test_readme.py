"""The README's Python examples run as written, on a real checkpoint and real image files."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import cv2

from cxrcam.data.cache import open_cache

README = Path(__file__).resolve().parents[1] / "README.md"


def python_examples() -> list[str]:
    """The ```python blocks of the README's "Python API" section, in order."""
    text = README.read_text()
    section = text[text.index("## Python API"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_python_examples_run(vinbig_model, tmp_path, capsys):
    cache_dir, ckpt = vinbig_model
    examples = python_examples()
    assert len(examples) == 2
    # what the first example names: a run folder's best.pt and a folder of images
    shutil.copytree(ckpt.parent, tmp_path / "runs" / "clf")
    cache = open_cache(cache_dir)
    (tmp_path / "images").mkdir()
    for image_id in cache.images["image_id"][:6]:
        cv2.imwrite(str(tmp_path / "images" / f"{image_id}.png"), cache.load(image_id))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        first: dict = {}
        exec(examples[0], first)
        assert first["summary"].images == 6
        found = first["found"]
        assert set(found["image_id"]) <= set(cache.images["image_id"][:6]) and len(found) >= 6  # "No finding" rows
        assert {"class_id", "score", "x_min"} <= set(found.columns)
        second: dict = {}
        exec(examples[1], second)
    finally:
        os.chdir(cwd)
    out = second["out"]
    assert tuple(out.cams.shape) == (4, 14, 224, 224) and float(out.cams.max()) <= 1.0
    assert len(second["found"]) == 4
    printed = capsys.readouterr().out
    assert "6 images," in printed and printed.count(" boxes\n") == 4

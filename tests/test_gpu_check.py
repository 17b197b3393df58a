"""`scripts/gpu_check.py --device cpu --quick`: the GPU battery, shrunk, runs end to end on a CPU,
so the one command a lent GPU's minutes go to cannot rot."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_the_gpu_battery_runs_shrunk_on_a_cpu(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    battery = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(battery)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--quick", "--out", str(tmp_path / "q.json")])
    here = tmp_path / "where it was run"
    here.mkdir()
    monkeypatch.chdir(here)
    battery.main()  # in this process: torch is imported once for the suite
    assert not list(here.iterdir())  # its scratch work went to a temporary folder, now removed
    result = json.loads((tmp_path / "q.json").read_text())
    assert result["quick"] and result["precision"] == "fp32" and result["device"].startswith("CPU")
    training = result["training"]
    assert training["images_per_s"] > 0 and 0 <= training["data_wait"] < 1 and training["ratio_to_pure_step"] > 0
    maps = result["maps"]
    assert set(maps) == {"pool input", "layer3", "layer3,layer4"}
    assert maps["pool input"]["diff"] < 1e-4 and maps["layer3"]["diff"] < 1e-4  # the engines equal the library
    assert {"all batched", "all loop", "needed batched", "needed loop"} <= set(maps["layer3"])
    quality = result["quality"]
    assert (quality["mean_auroc"] is None or 0 <= quality["mean_auroc"] <= 1) and "maxboxacc" in quality
    assert result["torchrun"] == {**result["torchrun"], "backend": "gloo", "ok": True}
    table = capsys.readouterr().out
    assert "| training images/s |" in table and "| torchrun x1 (gloo) | ok" in table

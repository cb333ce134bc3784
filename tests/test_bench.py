"""scripts/bench.py runs end to end on tiny sizes and writes the figures it prints (no timing asserts)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "b.json"
    res = bench.main(["--dataset", "digits", "--train-size", "600", "--epochs", "1", "--workers", "0",
                      "--sizes", "400", "--dim", "32", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["train"]["ratio"] == res["train"]["bdexp_images_per_s"] / res["train"]["torchvision_images_per_s"]
    assert saved["train"]["images"] == 600 and saved["train"]["bdexp_images_per_s"] > 0
    feats = saved["features"]["400"]
    assert all(feats[f"{k}_s"] > 0 for k in ("ac", "ss", "sr", "mmd2", "ed2", "swd1", "overlap"))
    assert saved["peak_rss_mb"] > 0

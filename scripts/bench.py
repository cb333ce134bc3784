"""bdexp benchmark: prints a table and writes JSON.

(a) training throughput (images/s) of bdexp's GPU-resident loop (DeviceLoader + train_model) against
    a plain torchvision pipeline (a Dataset of PIL images, transforms.RandomCrop + RandomHorizontalFlip
    + ToTensor, a DataLoader with workers, the same model, optimizer, batch size and device), and the
    ratio;
(b) wall time of the feature-space detectors and distances (AC, SS, SR, MMD², ED², SWD1, the overlap
    score) on n samples of d-dimensional features (default 10 000 and 50 000 of 512-d);
(c) peak memory: process RSS and, on CUDA, torch's peak allocated memory.

    python scripts/bench.py                       # everything, JSON to bench.json
    python scripts/bench.py --only train --epochs 3 --device cuda
    python scripts/bench.py --only features --sizes 10000

MMD² and ED² build n×n kernel matrices (O(n²) memory); a size whose matrices would not fit in half
the free memory is reported as skipped with the bytes it would need.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bdexp.data.loader import DeviceLoader  # noqa: E402
from bdexp.models import build_model  # noqa: E402
from bdexp.training.base import Regime  # noqa: E402
from bdexp.training.loop import train_model  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def load_images(name: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NCHW images and labels: Debian's Fashion-MNIST if present, else the bundled digits."""
    from omegaconf import OmegaConf

    from bdexp.data import load_dataset

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "dataset" / f"{name}.yaml")
    cfg.train_limit = n
    data = load_dataset(cfg, seed=0, cache_dir=None)
    return data.x_train, data.y_train


def train_cfg(epochs: int, batch_size: int):
    return SimpleNamespace(epochs=epochs, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=False,
                           milestones=[0.5, 0.75], gamma=0.1, batch_size=batch_size,
                           get=lambda k, d=None: {"amp": True, "compile": False, "log_every": 10}.get(k, d))


def make_model(x: torch.Tensor, device: torch.device, arch: str):
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    cfg = OmegaConf.create({"name": arch})
    return build_model(cfg, in_channels=x.shape[1], num_classes=10, image_size=x.shape[2],
                       mean=[0.5] * x.shape[1], std=[0.25] * x.shape[1]).to(device)


def bench_bdexp_loop(x, y, device, arch, epochs, batch_size, padding) -> float:
    model = make_model(x, device, arch)
    loader = DeviceLoader(x, y, batch_size=batch_size, device=device, seed=0, crop_padding=padding, flip=True,
                          drop_last=True)
    hist = train_model(model, loader, Regime(None), train_cfg(epochs, batch_size), device, describe="bdexp loop")
    return float(np.mean(hist["images_per_s"][1:] or hist["images_per_s"]))  # first epoch = warm-up


def bench_torchvision(x, y, device, arch, epochs, batch_size, padding, workers) -> float:
    from PIL import Image
    from torchvision import transforms

    class PILSet(torch.utils.data.Dataset):
        def __init__(self):
            mode = "L" if x.shape[1] == 1 else "RGB"
            arr = x.permute(0, 2, 3, 1).numpy()
            self.images = [Image.fromarray(a[..., 0] if mode == "L" else a, mode) for a in arr]
            self.labels = y.tolist()
            self.tf = transforms.Compose([transforms.RandomCrop(x.shape[2], padding=padding),
                                          transforms.RandomHorizontalFlip(), transforms.ToTensor()])

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.tf(self.images[i]), self.labels[i]

    loader = torch.utils.data.DataLoader(PILSet(), batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)
    model = make_model(x, device, arch)
    cfg = train_cfg(epochs, batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    rates = []
    model.train()
    for _ in range(epochs):
        t0, seen = time.perf_counter(), 0
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(yb)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - t0))
    return float(np.mean(rates[1:] or rates))


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_features(n: int, d: int, device: torch.device) -> dict:
    from omegaconf import OmegaConf

    from bdexp.analysis.kernels import ed2, mmd2, swd1
    from bdexp.analysis.overlap import OverlapScorer
    from bdexp.defenses.ac import detect_ac
    from bdexp.defenses.sr import detect_sr
    from bdexp.defenses.ss import detect_ss

    conf = Path(__file__).resolve().parents[1] / "conf" / "defense"
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(n - n // 10, d)).astype(np.float32)
    poison = (rng.normal(size=(n // 10, d)) + 0.5).astype(np.float32)
    feats = np.concatenate([clean, poison])
    reserve = rng.normal(size=(200, d)).astype(np.float32)
    out = {}
    for name, fn in (("ac", detect_ac), ("ss", detect_ss), ("sr", detect_sr)):
        cfg = OmegaConf.load(conf / f"{name}.yaml")[name]
        out[f"{name}_s"], _ = timed(lambda: fn(feats, reserve, cfg, assumed_ratio=0.1, rng=np.random.default_rng(0)))
    half = n // 2
    a = torch.from_numpy(feats[:half]).to(device)
    b = torch.from_numpy(feats[half:]).to(device)
    need = 3 * (2 * half) ** 2 * 8  # pooled n×n kernel and distance matrices in float64
    free = (torch.cuda.mem_get_info(device)[0] if device.type == "cuda"
            else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    for name, fn in (("mmd2", lambda: mmd2(a, b, "gmk_adaptive")), ("ed2", lambda: ed2(a, b))):
        if need > free / 2:
            out[f"{name}_s"] = None
            out[f"{name}_skipped"] = f"needs ~{need / 2**30:.0f} GiB for {2 * half}x{2 * half} matrices"
        else:
            out[f"{name}_s"], _ = timed(lambda: float(fn()))
    out["swd1_s"], _ = timed(lambda: float(swd1(a, b)))
    scorer_t, scorer = timed(lambda: OverlapScorer(norm=2, num_radii=10, center="p").fit(torch.from_numpy(reserve).to(device)))
    score_t, _ = timed(lambda: scorer.score(torch.from_numpy(feats).to(device)))
    out["overlap_s"] = scorer_t + score_t
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["train", "features"], default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist (Debian files) or digits")
    p.add_argument("--model", default="convnet")
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=3, help="epochs per pipeline; the first is warm-up")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--padding", type=int, default=2)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--json", type=Path, default=Path("bench.json"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else (platform.processor() or "cpu"), "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(args).items()}}
    if args.only in (None, "train"):
        try:
            x, y = load_images(args.dataset, args.train_size)
        except Exception as err:  # no Debian files: fall back to the bundled digits
            print(f"{args.dataset} unavailable ({err}); using digits")
            x, y = load_images("digits", args.train_size)
        common = (x, y, device, args.model, args.epochs, args.batch_size, args.padding)
        bd = bench_bdexp_loop(*common)
        tv = bench_torchvision(*common, workers=args.workers)
        result["train"] = {"images": len(y), "image_shape": list(x.shape[1:]), "bdexp_images_per_s": bd,
                           "torchvision_images_per_s": tv, "ratio": bd / tv, "workers": args.workers}
        print(f"training ({args.model}, {len(y)} images {tuple(x.shape[1:])}, batch {args.batch_size}, {device}): "
              f"bdexp {bd:,.0f} img/s, torchvision DataLoader ({args.workers} workers) {tv:,.0f} img/s, "
              f"ratio {bd / tv:.2f}")
    if args.only in (None, "features"):
        result["features"] = {}
        for n in args.sizes:
            res = bench_features(n, args.dim, device)
            result["features"][str(n)] = res
            cells = ", ".join(f"{k[:-2]} {v:.2f}s" if k.endswith("_s") and v is not None else
                              (f"{k[:-2]} skipped" if k.endswith("_s") else "") for k, v in res.items())
            print(f"features n={n} d={args.dim}: {cells.replace(', ,', ',')}")
    result["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        result["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(f"peak memory: RSS {result['peak_rss_mb']:.0f} MB"
          + (f", CUDA {result['cuda_peak_allocated_mb']:.0f} MB" if "cuda_peak_allocated_mb" in result else ""))
    tmp = args.json.with_name(f".{args.json.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, args.json)
    print(f"written {args.json}")
    return result


if __name__ == "__main__":
    main()

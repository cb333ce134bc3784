"""PNG figures of the `patterns` analysis, written into the run directory (ISCP Figs. 2, 4, 9, 13).

- patterns.png: rows = classes; the canvas (of the largest size's pattern), then the selected
  pattern at every size, shown on white (m_γ⊙x_c + (1 − m_γ)·1; white-canvas patterns on grey),
  titled with size, canvas type (the lowest-loss canvas may differ per size) and PW.
- patterns_canvases.png (several canvas types only): rows = classes, columns = canvas types,
  the best pattern of each type at `figure_size` (ISCP Figs. 4, 13).
- pattern_samples.png: rows = classes; the pattern at `figure_size`, then non-target images of the
  PW set with it attached and the model's prediction (red: sent to the class; ISCP Fig. 2).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bdexp.analysis.pattern_search import Selection, pasted_predictions


def _show(ax, img: torch.Tensor, title: str = "", color: str = "black") -> None:
    a = img.detach().float().clamp(0, 1).cpu().numpy()
    if a.shape[0] == 3:
        ax.imshow(np.transpose(a, (1, 2, 0)), vmin=0, vmax=1)
    else:
        ax.imshow(a[0], cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=6, color=color)
    ax.set_xticks([])
    ax.set_yticks([])


def on_white(mask: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """The pattern m⊙x_c shown on a white background (ISCP Figs. 2, 9); a pattern cut from the
    all-white canvas would vanish there, so it is shown on mid-grey instead."""
    background = 0.5 if float(canvas.min()) > 0.95 else 1.0
    return mask[None] * canvas + (1 - mask[None]) * background


def _grid(rows: int, cols: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(1.25 * cols, 1.35 * rows), squeeze=False)
    return plt, fig, axes


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class PWImages:
    """The PW set: `x` every test image (float, on the device), `index` the PW set's positions in
    it and `y` their labels."""

    x: torch.Tensor
    index: torch.Tensor
    y: torch.Tensor


def write_figures(exp, opts, sel: Selection, images: PWImages, run_dir: Path) -> list[Path]:
    """The PNGs of the module docstring for the patterns `sel` (`opts`: the analysis's
    PatternOptions); returns the files written."""
    names = list(getattr(exp.data, "classes", []) or [])
    label = (lambda c: f"{c}: {names[c]}"[:14] if c < len(names) else str(c))
    classes, sizes, fig_size = opts.classes, opts.sizes, opts.figure_size
    result, jobs, chosen, pw = sel.result, sel.jobs, sel.chosen, sel.pw
    x, pw_index, y_pw = images.x, images.index, images.y

    def job_for(c, kind):  # the job chosen at figure_size, else at the largest size
        return chosen.get((c, kind, fig_size), chosen.get((c, kind, max(sizes))))

    written = []
    plt, fig, axes = _grid(len(classes), len(sizes) + 1)
    for r, c in enumerate(classes):
        k0 = chosen[(c, None, max(sizes))]
        _show(axes[r, 0], result.canvases[k0], f"canvas: {jobs[k0].kind}")
        axes[r, 0].set_ylabel(label(c), fontsize=7)
        for col, size in enumerate(sizes, start=1):
            k = chosen[(c, None, size)]
            value = pw.get((k, size)) if pw else None
            shown = f" {value:.2f}" if value is not None and np.isfinite(value) else ""
            title = f"{100 * size:g}% {jobs[k].kind}{shown}"
            _show(axes[r, col], on_white(result.binary(k, size), result.canvases[k]), title)
    written.append(_save(plt, fig, run_dir / "patterns.png"))

    if len(opts.canvases) > 1:
        plt, fig, axes = _grid(len(classes), len(opts.canvases))
        for r, c in enumerate(classes):
            for col, kind in enumerate(opts.canvases):
                k = job_for(c, kind)
                if k is None:
                    axes[r, col].axis("off")
                    continue
                _show(axes[r, col], on_white(result.binary(k, fig_size), result.canvases[k]),
                      f"{kind} {fig_size:g}")
            axes[r, 0].set_ylabel(label(c), fontsize=7)
        written.append(_save(plt, fig, run_dir / "patterns_canvases.png"))

    if opts.samples > 0:
        rng = exp.rng("patterns/samples")
        plt, fig, axes = _grid(len(classes), opts.samples + 1)
        for r, c in enumerate(classes):
            k = job_for(c, None)
            mask = result.binary(k, fig_size)
            _show(axes[r, 0], on_white(mask, result.canvases[k]), f"pattern {100 * fig_size:g}%")
            axes[r, 0].set_ylabel(label(c), fontsize=7)
            others = pw_index[y_pw != c].numpy()
            pick = torch.as_tensor(rng.choice(others, size=min(opts.samples, len(others)), replace=False))
            imgs = x[pick.to(x.device)]
            preds = pasted_predictions(exp.model, mask[None], result.canvases[k][None], imgs, exp.device)[0]
            for col in range(1, opts.samples + 1):
                if col > len(pick):
                    axes[r, col].axis("off")
                    continue
                img = mask[None].to(imgs) * result.canvases[k].to(imgs) + (1 - mask[None].to(imgs)) * imgs[col - 1]
                p = int(preds[col - 1])
                _show(axes[r, col], img, f"→ {p}", "red" if p == c else "black")
        written.append(_save(plt, fig, run_dir / "pattern_samples.png"))
    return written

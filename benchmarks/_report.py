"""Write a benchmark's markdown table into docs/benchmarks.md between its own markers."""
from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = ("# Benchmarks\n\nEvery table here is written by a script in `benchmarks/`; rerun it to refresh its "
          "section. Baselines run in the same process as the method they are compared with, so read ratios, "
          "not absolute seconds.\n")


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def write_section(name: str, markdown: str, doc: Path = DOC) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.exists() else HEADER
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def runtime_lines(timing: dict, baseline: str, digits: int = 1) -> list[str]:
    """Markdown rows: median seconds per label and the ratio to ``baseline`` (same run)."""
    import numpy as np

    t0 = float(np.median(timing[baseline]))
    lines = ["", "Runtime per reconstruction (per posterior sample for diffusion methods), median over the run:",
             "", f"| method | seconds | ratio to {baseline} |", "|---|---|---|"]
    return lines + [f"| {k} | {np.median(v):.2f} | {np.median(v) / t0:.{digits}f} |" for k, v in timing.items()]


def image_grid(plt, counts_list, names, images, std_method: str, path: Path, titles: dict | None = None) -> None:
    """Rows: count levels; columns: ``names`` (images[(counts, name)] = (image, std)) and the
    posterior std of ``std_method``; grey scale shared per row (0 to 1.1 x the truth's max)."""
    import numpy as np

    fig, axes = plt.subplots(len(counts_list), len(names) + 1, figsize=(2.0 * (len(names) + 1), 2.1 * len(counts_list)))
    axes = np.atleast_2d(axes)
    for i, c in enumerate(counts_list):
        vmax = float(images[(c, "truth")][0].max()) * 1.1
        panels = [(images[(c, n)][0], "gray_r", (titles or {}).get(n, n)) for n in names]
        panels.append((images[(c, std_method)][1], "magma", f"{std_method} posterior std"))
        for j, (img, cmap, title) in enumerate(panels):
            ax = axes[i, j]
            if img is not None:
                ax.imshow(img, cmap=cmap, **({"vmin": 0, "vmax": vmax} if cmap == "gray_r" else {}))
            ax.set_xticks([]); ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{c:.0e} trues", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)

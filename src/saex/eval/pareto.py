"""The L0-vs-FVU Pareto plot of a run's SAEs (PNG and SVG)."""

from __future__ import annotations

from pathlib import Path


def pareto_plot(results: dict[str, dict], out_stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=150)
    by_arch: dict[str, list] = {}
    for name, m in results.items():
        by_arch.setdefault(m.get("architecture", name), []).append((m["l0"], m["fvu"], name))
    for arch, points in sorted(by_arch.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=arch)
        for l0, fvu, name in points:
            ax.annotate(name, (l0, fvu), fontsize=6, alpha=0.7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("FVU (fraction of variance unexplained)")
    ax.set_title("Sparsity vs reconstruction (lower left is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_stem.with_suffix(".png"), out_stem.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p)
    plt.close(fig)
    return paths

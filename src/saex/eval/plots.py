"""Plots of eval results: the L0-vs-FVU Pareto plot of a run's SAEs and each SAE's density histogram."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_stem: Path) -> list[Path]:
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_stem.with_suffix(".png"), out_stem.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p)
    _pyplot().close(fig)
    return paths


def pareto_plot(results: dict[str, dict], out_stem: Path) -> list[Path]:
    plt = _pyplot()
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
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))  # labels even within one decade
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("FVU (fraction of variance unexplained)")
    ax.set_title("Sparsity vs reconstruction (lower left is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_stem)


def density_plot(metrics: dict, out_stem: Path) -> list[Path]:
    """Histogram of log10 firing density, dead latents as a separate bar on the left."""
    plt = _pyplot()
    edges, counts = metrics["density_hist"]["log10_bin_edges"], metrics["density_hist"]["counts"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=150)
    ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges, edges[1:])], align="edge", color="#4c72b0")
    dead = round(metrics["dead_frac"] * metrics["d_sae"])
    ax.bar([edges[0] - 0.5], [dead], width=0.4, color="#c44e52", label=f"dead ({dead})")
    ax.set_xlabel("log10 firing density")
    ax.set_ylabel("latents")
    ax.set_title(f"{metrics['sae']}: L0 {metrics['l0']:.1f}, FVU {metrics['fvu']:.3f} over {metrics['tokens']:,} tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_stem)

"""PNG figures of an edit's effect (matplotlib, Agg): for an image model the input, the class
probabilities clean vs edited and the nearest examples before and after; for a model with a
next-token readout the tokens the edit made likelier and less likely. Returned as bytes, so that the
caller writes them with everything else or not at all."""

from __future__ import annotations

import io

CLEAN, EDITED = "#7f8c8d", "#d35400"


def effect_png(result: dict, image=None, neighbours: dict | None = None, title: str | None = None) -> bytes | None:
    """The figure for `saex edit`'s `result` (Experiment.effect's dict): with `image` (the input) and
    `neighbours` ({"before"|"after": [(image, caption)]}) for an image model; a token chart for a text
    model whose readout has logits; None when there is nothing worth drawing (a sentence encoder's
    embedding: the table and effect.json say it all). `title` (the edits, say) heads it."""
    title = f"SAE {result['sae']} at {result['hook']}: {title or _changed(result)}"
    if image is not None:
        return _image_figure(result, image, neighbours or {}, title)
    effect = result.get("effect") or {}
    if effect.get("gained") or effect.get("lost"):
        return _token_figure(effect, title)
    return None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    _plt().close(fig)
    return buf.getvalue()


def _rows(effect: dict) -> list[dict]:
    """The classes to draw: all of a small label set, else those the edit moved most."""
    if effect.get("probs"):
        return effect["probs"]
    return sorted(effect.get("gained", []) + effect.get("lost", []), key=lambda r: -abs(r["delta"]))[:12]


def _show(ax, image, title: str, fontsize: float) -> None:
    gray = getattr(image, "mode", "") == "L"
    ax.imshow(image, cmap="gray" if gray else None, vmin=0 if gray else None, vmax=255 if gray else None)
    ax.set_title(title, fontsize=fontsize)
    ax.set_xticks([])
    ax.set_yticks([])


def _image_figure(result: dict, image, neighbours: dict, title: str) -> bytes:
    plt = _plt()
    sides = [s for s in ("before", "after") if neighbours.get(s)]
    k = max([len(neighbours[s]) for s in sides] + [6])
    fig = plt.figure(figsize=(max(9.0, 1.2 * k), 3.2 + 1.5 * len(sides)))
    grid = fig.add_gridspec(1 + len(sides), k, height_ratios=[2.4] + [1.3] * len(sides), hspace=0.6,
                            left=0.06, right=0.98, top=0.88, bottom=0.03)
    label = f" ({result['label']})" if result.get("label") else ""
    _show(fig.add_subplot(grid[0, :2]), image, f"input {result['example']}{label}", 9)
    effect = result.get("effect") or {}
    rows = _rows(effect)
    if rows:
        ax = fig.add_subplot(grid[0, 3:])
        y = range(len(rows))
        ax.barh([i - 0.2 for i in y], [r["clean"] for r in rows], 0.4, color=CLEAN, label="clean")
        ax.barh([i + 0.2 for i in y], [r["edited"] for r in rows], 0.4, color=EDITED, label="edited")
        ax.set_yticks(list(y), [r["name"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("probability", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7, loc="best")
        ax.set_title(f"{effect['top_clean']} -> {effect['top_edited']}   KL {effect['kl']:.3f} nats", fontsize=9)
    for r, side in enumerate(sides, start=1):
        for c, (img, caption) in enumerate(neighbours[side]):
            ax = fig.add_subplot(grid[r, c])
            _show(ax, img, caption, 6.5)
            if c == 0:
                ax.set_ylabel(f"nearest\n{side}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def _token_figure(effect: dict, title: str) -> bytes:
    plt = _plt()
    rows = sorted(effect.get("gained", [])[:8] + effect.get("lost", [])[:8], key=lambda r: -r["delta"])
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(rows) + 1.6))
    ax.barh(range(len(rows)), [r["delta"] for r in rows], color=[EDITED if r["delta"] > 0 else CLEAN for r in rows])
    ax.set_yticks(range(len(rows)), [repr(r["name"]) for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel("change in next-token probability (edited - clean)", fontsize=8)
    ax.set_title(f"{title}\ntop {effect['top_clean']!r} -> {effect['top_edited']!r}, "
                 f"KL {effect['kl']:.3f} nats", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _changed(result: dict) -> str:
    changed = [c["feature"] for c in result["features_changed"]]
    shown = ", ".join(map(str, changed[:6])) + (f" (+{len(changed) - 6})" if len(changed) > 6 else "")
    return f"latents changed {shown or 'none'}"

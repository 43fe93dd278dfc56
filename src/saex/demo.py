"""`saex demo`: the whole pipeline on an embedded default, as far as it is built."""

from __future__ import annotations

from dataclasses import dataclass

from saex.harvest import HarvestConfig, harvest


@dataclass
class DemoConfig:
    run: str = "runs/demo"
    """Run folder of the demo."""
    text: bool = False
    """Use minilm on Wikipedia summaries instead of fmnist-vit on Fashion-MNIST."""
    max_examples: int = 10000
    """Examples to harvest."""
    serve: bool = True
    """Serve the explorer at the end (once the explorer exists)."""


def demo(cfg: DemoConfig) -> dict:
    if cfg.text:
        h = HarvestConfig(run=cfg.run + "-text", model="minilm", dataset="wiki", hook=["blocks.3.hook_resid_post"],
                          max_examples=cfg.max_examples, batch_size=32)
    else:
        h = HarvestConfig(run=cfg.run, model="fmnist-vit", dataset="fashion-mnist", hook=["blocks.2.hook_resid_post"],
                          max_examples=cfg.max_examples, batch_size=256)
    manifest = harvest(h)
    print(f"demo: activations of {h.model} on {h.dataset} are in {h.run}/acts "
          f"({manifest['rows']:,} rows, d {manifest['d_model']}). Training, evaluation and the explorer come next.")
    return manifest

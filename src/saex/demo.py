"""`saex demo`: the whole pipeline on an embedded default, as far as it is built."""

from __future__ import annotations

from dataclasses import dataclass

from saex.eval import EvalConfig, evaluate
from saex.explorer.index import IndexConfig, build_index
from saex.explorer.serve import ExploreConfig, explore
from saex.harvest import HarvestConfig, harvest
from saex.train import TrainConfig, train


@dataclass
class DemoConfig:
    run: str = "runs/demo"
    """Run folder of the demo (the text demo appends -text)."""
    text: bool = False
    """Use minilm on Wikipedia summaries instead of fmnist-vit on Fashion-MNIST."""
    max_examples: int | None = None
    """Examples to harvest (default: 10,000 images or 2,000 articles)."""
    steps: int = 1000
    """Training steps of the demo SAE."""
    serve: bool = True
    """Serve the explorer at the end (--no-serve stops after building everything)."""
    port: int = 8000
    """Port of the explorer."""


def demo(cfg: DemoConfig) -> dict:
    if cfg.text:
        run = cfg.run + "-text"
        h = HarvestConfig(run=run, model="minilm", dataset="wiki", hook=["blocks.3.hook_resid_post"],
                          max_examples=cfg.max_examples or 2000, batch_size=64)
        eval_examples = 300
    else:
        run = cfg.run
        h = HarvestConfig(run=run, model="fmnist-vit", dataset="fashion-mnist", hook=["blocks.2.hook_resid_post"],
                          tokens="cls", max_examples=cfg.max_examples or 10000, batch_size=256)
        eval_examples = 2000
    print(f"demo 1/4: harvest {h.model} activations at {h.hook[0]} over {h.dataset}")
    harvest(h)
    print("demo 2/4: train a TopK SAE (k 32, 8x expansion)")
    train(TrainConfig(run=run, architecture="topk", k=32, steps=cfg.steps))
    print("demo 3/4: evaluate it on held-out examples, spliced into the model")
    results = evaluate(EvalConfig(run=run, examples=eval_examples))
    print("demo 4/4: index the features for the explorer")
    # the index's ablation pass runs the model's later layers once per (feature, top example): 3 s for
    # fmnist-vit's 1,024 features, hours for minilm's 3,072 on 128-token texts on 2 CPU cores
    build_index(IndexConfig(run=run, ablation=not cfg.text))
    print(f"demo: the pipeline is done; everything is in {run}/ (acts/, saes/, eval/, index/, logs/)")
    if cfg.serve:
        explore(ExploreConfig(run=run, port=cfg.port))
    else:
        print(f"explore it with: saex explore {run}")
    return results

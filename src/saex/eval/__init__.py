"""Metrics: reconstruction, sparsity, spliced downstream loss; the Pareto plot."""

from saex.eval.run import EvalConfig, evaluate

__all__ = ["EvalConfig", "evaluate"]

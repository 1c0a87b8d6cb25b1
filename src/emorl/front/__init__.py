"""The steerability study: each mixing mode's Pareto front, hypervolume and dominance over one-policy methods."""

from emorl.front.run import analyse, front_run

__all__ = ["analyse", "front_run"]

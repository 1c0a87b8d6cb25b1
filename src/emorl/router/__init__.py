"""Per-prompt mixing weights (``--weights auto``): a light router from the client statement's MiniLM embedding to
the weights, fitted on lattice scores of training prompts. See docs/router.md.

>>> from emorl.router import fit_run, route          # decode with emorl.decoding.decode_routed
>>> router, meta = fit_run("runs/default", cfg)                 # RUN/router/
>>> weights, fallback, _ = route("runs/default", ens, prompts)   # B x K, one row per prompt
"""

from emorl.router.data import simplex_lattice
from emorl.router.decode import route, route_weights
from emorl.router.fit import Router, fit_router
from emorl.router.run import fit_run
from emorl.router.store import ROUTER_VERSION, load_router, save_router

__all__ = ["ROUTER_VERSION", "Router", "fit_router", "fit_run", "load_router", "route", "route_weights",
           "save_router", "simplex_lattice"]

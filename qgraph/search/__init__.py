"""HAGO-style mixed-precision strategy search (DESIGN.md §4-§5).

space (per node: float / int8 / int4 / BCQ-q choices the target runs, tie groups) → sensitivity Ω
(Hutchinson Hessian traces, or a one-layer-at-a-time proxy) → driver (greedy, ILP, NSGA-II) proposing
strategies → trials (qgraph's own passes on a shared traced graph; cached on disk, process pool or Ray)
→ Pareto front, chosen strategy, report. Entry points: `run_search` and ``qgraph search``.
"""
from qgraph.search.objectives import Constraints, EvalConfig, Workbench
from qgraph.search.run import SearchOptions, SearchResult, run_search
from qgraph.search.space import Choice, SearchError, Space, SpaceOptions, build_space
from qgraph.search.strategy import Strategy

__all__ = ["Choice", "Constraints", "EvalConfig", "SearchError", "SearchOptions", "SearchResult", "Space",
           "SpaceOptions", "Strategy", "Workbench", "build_space", "run_search"]

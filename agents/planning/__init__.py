"""Batched MCTS: the tensor tree (tree.py), the search (search.py), Gumbel MuZero's root
(gumbel.py) and the planning models (models.py: true simulator, any WorldModel)."""

from agents.planning.search import PlanningModel, SearchConfig, SearchResult, search

__all__ = ["PlanningModel", "SearchConfig", "SearchResult", "search"]

"""Workloads: what is tuned. Operators (a TE definition, a float64 numpy reference, a FLOP count)
and the search-space files that name them with shapes and dtypes."""

from .ops import OPERATORS, get_operator
from .spec import SearchSpace, Workload, load_space

__all__ = ["OPERATORS", "SearchSpace", "Workload", "get_operator", "load_space"]

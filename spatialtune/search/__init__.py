"""Search: design spaces, candidates, the evolutionary search and uniform sampling, the cost
models, and the one policy that picks what to measure next for a (workload, condition)."""

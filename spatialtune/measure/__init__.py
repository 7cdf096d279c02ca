"""Measurement: long-lived worker processes, builders (scheduled IR in, kernel artifacts out) and
runners (artifacts in, checked and timed results under a share next to a neighbour out).
Failures are data: every result has a status and a message; only a broken builder or runner
raises."""

"""Measuring on many boxes through TVM's RPC tracker: ``spatialtune serve`` on each measuring host
(:mod:`.server`, :mod:`.service`), and on the driver a runner that sends built kernels to free
servers (:mod:`.runner`, :mod:`.pool`, :mod:`.client`, :mod:`.tracker`). See docs/distributed.md."""

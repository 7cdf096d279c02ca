"""Low-level CUDA helpers shared by partitions, neighbours and measuring workers: the driver API
(cuda-bindings), green contexts with their ``cudaSetDevice`` shim, and cubin compilation.

Nothing here imports TVM; everything imports cuda-bindings lazily, so the package can be
imported on a machine without a GPU.
"""

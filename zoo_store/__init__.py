import os

# Deterministic cuBLAS for seeded, repeatable compositions on CUDA (must be set before CUDA starts).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

"""InCo: instance contrast with dynamic weighted variance, and its baselines, in plain PyTorch.

Importable without any service: no Ray, Redis, FastAPI or SQL code is imported from here.
"""

__version__ = "0.1.0"

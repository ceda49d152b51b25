"""The HTTP service: FastAPI routes, tenancy and quotas, state stores, metrics.

Import :mod:`parrot.server.app` (FastAPI) or :mod:`parrot.server.serve`
explicitly; this package imports nothing heavy, so ``import parrot`` stays
free of the service's libraries.
"""

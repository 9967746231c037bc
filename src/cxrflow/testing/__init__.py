"""Generators for tests and benchmarks: tiny synthetic stores, collections in every supported format,
evaluated studies, and the loader's batch-mixing measure. Nothing in the product imports them
(``cxrflow synth``, the synthetic release a user asks for, is :mod:`cxrflow.data.synth`)."""

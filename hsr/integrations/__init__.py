"""hsr.integrations: adapters to other libraries (transformers).

Importing this package imports neither transformers nor the model; use the submodules:
``hsr.integrations.transformers`` (real-model data for the tests and benchmarks: ``hsr.testing.realdata``).
"""

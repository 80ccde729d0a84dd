"""hsr.integrations: adapters to other libraries (transformers) and real-model data.

Importing this package imports neither transformers nor the model; use the submodules:
``hsr.integrations.transformers`` and ``hsr.integrations.realdata``.
"""

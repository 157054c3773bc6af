"""The application layer: the only place that composes data, models, training, inference and evaluation.

``prepare`` (data -> split manifest), ``train`` / ``resume``, ``evaluate``, ``export``, ``demo``; each returns a typed
result. The CLI, the service and the Python API call these.
"""

"""The engine side: the vLLM engine spec, runners, and model builders.

Nothing here imports vLLM or torch at import time; the model builders are
scripts run with the engine's own Python.
"""

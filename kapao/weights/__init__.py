"""Weights: kapao checkpoints (plain data), official KAPAO checkpoints (read without running code),
the table of named weights with its cache and downloads, and the one entry point :func:`load_model`.

Modules: :mod:`~kapao.weights.checkpoint` (save/load kapao checkpoints, build a network for a
state_dict), :mod:`~kapao.weights.unpickle` and :mod:`~kapao.weights.official` (official files),
:mod:`~kapao.weights.registry` (named weights, cache folder, download), :mod:`~kapao.weights.loader`
(:func:`load_weights`, :func:`load_model`).
"""

"""Backbones and their cut points (registry), truncated models, cost counting, and the transfer
strategies that build a model to train from a backbone and a cut."""

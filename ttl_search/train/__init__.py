"""One trial: fine-tune the model a strategy builds, select on validation, test once; its metrics.
Knows nothing about Ray or Optuna."""

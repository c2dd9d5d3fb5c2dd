"""The evaluation harness (installed as ``g3dr.eval``): metrics sweeps over checkpoints, logged to MLflow."""

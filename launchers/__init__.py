"""SLURM/local launchers (installed as ``g3dr.launchers``): submitit jobs that run prep, train and eval."""

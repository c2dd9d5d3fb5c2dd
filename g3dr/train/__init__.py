"""Training of f_trigen on DeepSpeed: schedules, the derived DeepSpeed config, checkpoints, tracking, the
task (f_trigen + renderer + frozen critics) and the trainer loop. ``g3dr train`` lives in ``g3dr.train.cli``.

Importing this package is cheap; heavy modules (deepspeed, mlflow) are imported where they are used.
"""

"""Training on DeepSpeed: the trainer loop (``trainer``), what it trains (``stage``: f_trigen; ``sr``: the
super-resolution stage), the task (f_trigen + renderer + frozen critics), the checkpoint manager
(``checkpointer``) over the checkpoint folders (``checkpoint``), the logging window (``metrics_log``), schedules,
the derived DeepSpeed config and tracking. ``g3dr train`` lives in ``g3dr.train.cli``.

Importing this package is cheap; heavy modules (deepspeed, mlflow) are imported where they are used.
"""

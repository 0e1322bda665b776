"""Training engine: loops, checkpoints, distributed execution, schedules, run configuration.

- :mod:`mambamim.engine.pretrain_loop` — ``pretrain(PretrainConfig) -> Path`` (run folder).
- :mod:`mambamim.engine.finetune_loop` — ``finetune(FinetuneConfig) -> Path``.
- :mod:`mambamim.engine.config` — ``PretrainConfig`` / ``FinetuneConfig`` (YAML in the run folder).
- :mod:`mambamim.engine.checkpoint` — atomic ``save_checkpoint`` / ``load_checkpoint``, RNG capture,
  ``load_encoder_weights`` (with its report), ``model_from_checkpoint`` for evaluate / predict.
- :mod:`mambamim.engine.distributed` — torchrun / DDP helpers that degrade to one process.
- :mod:`mambamim.engine.schedule` — warm-up + cosine LR, resumable data position.

Submodules are imported on use (``from mambamim.engine.checkpoint import ...``) to keep
``import mambamim`` light.
"""

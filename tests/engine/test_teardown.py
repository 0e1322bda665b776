"""Trainer.train tears down in order: the trainer, which under DDP holds the wrapper and through it the process
group and the reducer's gloo work, is freed before the group is destroyed. A trainer sits in reference cycles;
left to a later collection or to the interpreter's exit, gloo's teardown can abort the process."""

from __future__ import annotations

import gc
import weakref

from engine_standins import TinyPretrainer, make_tiny_cache


def test_trainer_is_freed_before_the_process_group_is_destroyed(tmp_path, monkeypatch):
    from mambamim.engine import distributed as D
    from mambamim.engine import pretrain_loop
    from mambamim.engine import trainer as T
    from mambamim.engine.config import PretrainConfig

    refs, alive_at_cleanup = [], []
    execute, cleanup = T.Trainer.execute, D.cleanup

    def recording_execute(self):
        refs.append(weakref.ref(self))
        return execute(self)

    def recording_cleanup(ctx=None):
        alive_at_cleanup.append(refs[0]() is not None)
        cleanup(ctx)

    monkeypatch.setattr(T.Trainer, "execute", recording_execute)
    monkeypatch.setattr(D, "cleanup", recording_cleanup)
    monkeypatch.setattr(pretrain_loop.PretrainTrainer, "build_model", lambda self: TinyPretrainer())
    monkeypatch.setattr(pretrain_loop.PretrainTrainer, "preview_volume", lambda self: None)
    config = PretrainConfig(data=str(make_tiny_cache(tmp_path, num=2)), out=str(tmp_path / "run"), crop=32,
                            num_crops=1, batch_size=1, steps=2, warmup_steps=1, workers=0, device="cpu",
                            progress=False, vis_every=0, log_every=1, save_every=0, seed=0)
    gc.disable()  # no automatic collection may free the trainer by chance between the run and the teardown
    try:
        pretrain_loop.pretrain(config)
    finally:
        gc.enable()
    assert alive_at_cleanup == [False]

"""A run folder's life: who may write into it, and what ``--resume`` takes from the saved run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Collection

from mambamim.engine import distributed as D
from mambamim.engine.logging_utils import RunExistsError, check_run_folder, move_run_aside

__all__ = ["resolve_resume", "claim_run_folder", "SESSION_OPTIONS", "BOOKKEEPING_OPTIONS"]


# Options of the session, not of the run: on resume they always come from the resuming command.
SESSION_OPTIONS = ("stop_after", "progress", "resume", "overwrite")
# Options that change neither the maths nor the data: an explicit value may change them on resume.
BOOKKEEPING_OPTIONS = ("log_every", "checkpoint_steps", "save_every", "vis_every")


def resolve_resume(config: Any, config_cls: type, explicit: Collection[str] | None = None) -> Any:
    """For ``config.resume = RUN``: the run's saved configuration (``RUN/config.yaml``) with the
    options allowed to change on resume taken from ``config``.

    ``explicit`` None (the Python API): every option of ``config_cls.RESUME_OVERRIDABLE`` (device,
    workers, stop_after, progress, ...) comes from ``config``. ``explicit`` given (the command line:
    the options the user typed): the saved value of every option is kept unless it is named there;
    a named option that may change on resume (``RESUME_OVERRIDABLE`` and bookkeeping such as
    ``log_every``) takes ``config``'s value, and one that would change the training (lr, crop, data,
    ...) is refused when it differs from the saved value. ``stop_after`` and ``progress`` belong to
    the session and always come from ``config``.

    Raises:
        FileNotFoundError: RUN has no config.yaml, or no checkpoint at all.
        ValueError: an explicit option that cannot change on resume differs from the saved one.
    """
    if not config.resume or getattr(config, "_resume_resolved", False):
        return config
    run = Path(config.resume)
    saved = config_cls.load_yaml(run / "config.yaml")
    folder = run / "checkpoints"
    if not (folder / "last.pt").exists() and not any(folder.glob("epoch_*.pt")):
        raise FileNotFoundError(f"cannot resume {run}: no checkpoint in {folder} (the run stopped before its first "
                                "checkpoint); start over with --overwrite")
    if explicit is None:
        take = set(config_cls.RESUME_OVERRIDABLE)
    else:
        changeable = set(config_cls.RESUME_OVERRIDABLE) | set(BOOKKEEPING_OPTIONS)
        fields = {f.name for f in dataclasses.fields(config_cls)}
        mine, theirs = config.resolved(), saved.resolved()  # a relative --data names the same folder
        refused = [name for name in sorted(set(explicit) & fields - changeable - set(SESSION_OPTIONS))
                   if getattr(mine, name) != getattr(theirs, name)]
        if refused:
            listing = ", ".join(f"{n} (saved {getattr(saved, n)!r}, given {getattr(config, n)!r})" for n in refused)
            raise ValueError(f"cannot resume {run} with other training options: {listing}; resume without them, "
                             "or start a new run")
        take = (set(explicit) & changeable) | set(SESSION_OPTIONS)
    for name in sorted(take):
        setattr(saved, name, getattr(config, name))
    saved.out = str(run)
    saved.resume = str(run)
    saved.validate()
    saved._resume_resolved = True  # not a field: pretrain() / finetune() must not merge it again
    return saved


def claim_run_folder(run: Path, config: Any, main: bool) -> Path | None:
    """Rank 0 checks ``run`` for an earlier run (and moves it aside with ``config.overwrite``); the
    verdict goes to every rank so that all raise together. Returns where the earlier run went."""
    problem, moved = None, None
    if main:
        overwrite = bool(getattr(config, "overwrite", False))
        try:
            check_run_folder(run, resume=bool(config.resume), overwrite=overwrite)
            if overwrite and not config.resume:
                moved = move_run_aside(run)
        except RunExistsError as exc:
            problem = str(exc)
        except OSError as exc:
            problem = f"cannot move the earlier run in {run} aside: {exc}"
    problem = D.broadcast_object(problem)
    if problem:
        raise RunExistsError(problem)
    return moved

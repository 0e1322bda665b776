"""No silent overwrites: a new pre-training / fine-tuning run refuses an --out that already holds a
run unless --resume continues it or --overwrite starts over (the earlier run is moved aside)."""

from __future__ import annotations

import csv

import pytest

from engine_standins import fake_cache, make_tiny_cache, patch_finetune, patch_pretrain
from mambamim.cli.main import main
from mambamim.engine.checkpoint import load_checkpoint
from mambamim.engine.config import FinetuneConfig, PretrainConfig
from mambamim.engine.finetune_loop import finetune
from mambamim.engine.logging_utils import RunExistsError, check_run_folder, move_run_aside, run_files
from mambamim.engine.pretrain_loop import pretrain

COMMON = ["--size", "tiny", "--crop", "32", "--batch-size", "1", "--num-crops", "1", "--workers", "0",
          "--device", "cpu", "--no-progress", "--log-every", "1"]


def _pre(tmp_path, out="run", **kw):
    base = dict(data=str(tmp_path / "cache"), out=str(tmp_path / out), crop=16, batch_size=2, num_crops=1,
                steps=3, warmup_steps=1, workers=0, device="cpu", progress=False, vis_every=0, log_every=1,
                save_every=0, lr=1e-2)
    base.update(kw)
    return PretrainConfig(**base)


def _ft(tmp_path, out="ft", **kw):
    base = dict(data=str(tmp_path / "cache"), out=str(tmp_path / out), crop=16, batch_size=2, num_crops=1,
                iterations=3, warmup_steps=1, workers=0, device="cpu", progress=False, log_every=1, fold=-1,
                val_every=0, lr=1e-2)
    base.update(kw)
    return FinetuneConfig(**base)


def _snapshot(run):
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def _steps(run):
    return [int(r["step"]) for r in csv.DictReader((run / "metrics.csv").open())]


def _aside(run):
    return sorted(run.glob(".overwritten-*"))


def test_pretrain_refuses_a_finished_run_and_leaves_it_intact(tmp_path, monkeypatch):
    fake_cache(tmp_path / "cache")
    patch_pretrain(monkeypatch)
    run = pretrain(_pre(tmp_path))
    before = _snapshot(run)
    with pytest.raises(RunExistsError) as info:
        pretrain(_pre(tmp_path, steps=2))
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in msg
    assert "already holds a run" in msg and "checkpoints/last.pt" in msg and "--resume" in msg and "--overwrite" in msg
    assert _snapshot(run) == before  # last.pt, metrics.csv, config.yaml, log.txt byte-identical
    assert not _aside(run)


def test_pretrain_overwrite_starts_over_and_keeps_the_old_run_aside(tmp_path, monkeypatch):
    fake_cache(tmp_path / "cache")
    patch_pretrain(monkeypatch)
    run = pretrain(_pre(tmp_path, steps=3))
    old_last = (run / "checkpoints" / "last.pt").read_bytes()
    old_metrics = (run / "metrics.csv").read_bytes()
    pretrain(_pre(tmp_path, steps=2, overwrite=True))
    assert _steps(run) == [1, 2]  # only the new run's rows
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2
    (aside,) = _aside(run)
    assert (aside / "checkpoints" / "last.pt").read_bytes() == old_last
    assert (aside / "metrics.csv").read_bytes() == old_metrics
    assert (aside / "config.yaml").is_file() and (aside / "log.txt").is_file()
    assert "moved aside" in (run / "log.txt").read_text()
    # a second overwrite (within the same second, too) gets its own folder
    pretrain(_pre(tmp_path, steps=3, overwrite=True))
    assert len(_aside(run)) == 2 and _steps(run) == [1, 2, 3]


def test_pretrain_resume_still_works_and_resume_excludes_overwrite(tmp_path, monkeypatch):
    fake_cache(tmp_path / "cache")
    patch_pretrain(monkeypatch)
    run = pretrain(_pre(tmp_path, steps=4, stop_after=2, overwrite=True))  # overwrite on a fresh folder: fine
    pretrain(PretrainConfig(resume=str(run), device="cpu", workers=0, progress=False))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4 and _steps(run) == [1, 2, 3, 4]
    assert not _aside(run)  # the saved overwrite=True does not apply to the resumed session
    with pytest.raises(ValueError, match="exclude each other"):
        pretrain(PretrainConfig(resume=str(run), overwrite=True, device="cpu", workers=0, progress=False))


def test_empty_or_unrelated_folder_is_fine(tmp_path, monkeypatch):
    fake_cache(tmp_path / "cache")
    patch_pretrain(monkeypatch)
    (tmp_path / "empty").mkdir()
    pretrain(_pre(tmp_path, out="empty"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    pretrain(_pre(tmp_path, out="other"))
    assert (other / "notes.txt").read_text() == "mine" and _steps(other) == [1, 2, 3]


def test_finetune_refuses_then_overwrite_then_resume(tmp_path, monkeypatch):
    fake_cache(tmp_path / "cache")
    patch_finetune(monkeypatch)
    run = finetune(_ft(tmp_path, iterations=3))
    before = _snapshot(run)
    with pytest.raises(RunExistsError, match="already holds a run"):
        finetune(_ft(tmp_path, iterations=2))
    assert _snapshot(run) == before
    finetune(_ft(tmp_path, iterations=4, stop_after=2, overwrite=True))
    assert _steps(run) == [1, 2]
    (aside,) = _aside(run)
    assert (aside / "checkpoints" / "last.pt").read_bytes() == before["checkpoints/last.pt"]
    finetune(FinetuneConfig(resume=str(run), device="cpu", workers=0, progress=False))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4 and _steps(run) == [1, 2, 3, 4]


def test_run_folder_helpers(tmp_path):
    run = tmp_path / "r"
    assert run_files(run) == [] and check_run_folder(run) == []
    (run / "checkpoints").mkdir(parents=True)
    (run / "cache").mkdir()
    (run / "mine.txt").write_text("x")
    assert run_files(run) == []  # an empty checkpoints folder, a cache and unrelated files are no run
    (run / "checkpoints" / "epoch_0001.pt").write_bytes(b"a")
    (run / "checkpoints" / "best.pt").write_bytes(b"b")
    (run / "metrics.csv").write_text("step\n1\n")
    assert run_files(run) == ["checkpoints/best.pt", "checkpoints/epoch_0001.pt", "metrics.csv"]
    with pytest.raises(RunExistsError, match="cannot be resumed"):
        check_run_folder(run)
    assert check_run_folder(run, resume=True) == []
    assert check_run_folder(run, overwrite=True)
    dest = move_run_aside(run)
    assert dest is not None and dest.parent == run and dest.name.startswith(".overwritten-")
    assert (dest / "checkpoints" / "best.pt").read_bytes() == b"b" and (dest / "metrics.csv").is_file()
    assert (run / "cache").is_dir() and (run / "mine.txt").is_file() and run_files(run) == []
    assert move_run_aside(run) is None


def test_cli_finetune_refuses_and_overwrite_starts_over(tmp_path, monkeypatch, capsys):
    fake_cache(tmp_path / "cache")
    patch_finetune(monkeypatch)
    run = tmp_path / "ft"
    args = ["finetune", "--data", str(tmp_path / "cache"), "--out", str(run), "--size", "tiny", "--crop", "16",
            "--batch-size", "2", "--num-crops", "1", "--workers", "0", "--device", "cpu", "--no-progress",
            "--log-every", "1", "--iterations", "2", "--warmup-steps", "1", "--val-every", "0", "--fold", "-1"]
    assert main(args) == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mambamim finetune: ") and "\n" not in err and "already holds a run" in err
    assert _snapshot(run) == before
    assert main([*args, "--overwrite"]) == 0
    assert _steps(run) == [1, 2] and len(_aside(run)) == 1


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return make_tiny_cache(tmp_path_factory.mktemp("data"))


def test_cli_pretrain_refuses_with_one_line_and_overwrite_starts_over(tiny_cache, tmp_path, capsys):
    run = tmp_path / "pre"
    args = ["pretrain", "--data", str(tiny_cache), "--out", str(run), *COMMON, "--steps", "2", "--warmup-steps", "1",
            "--decoder-width", "16", "--vis-every", "0", "--save-every", "0"]
    assert main(args) == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mambamim pretrain: ") and "\n" not in err and "Traceback" not in err
    assert f"{run} already holds a run (checkpoints/last.pt" in err
    assert f"--resume {run}" in err and "--overwrite" in err
    assert _snapshot(run) == before
    assert main([*args, "--overwrite"]) == 0
    assert _steps(run) == [1, 2] and len(_aside(run)) == 1
    with pytest.raises(SystemExit):  # argparse: not allowed with each other
        main(["pretrain", "--resume", str(run), "--overwrite"])
    capsys.readouterr()

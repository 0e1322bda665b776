#!/usr/bin/env python3
"""The replication of issue 17 item 3: does MambaMIM pre-training help, and do its parts matter?

Arms (all HyMamba, same data, steps and seeds; only the pre-training differs):

    scratch      no pre-training
    toki75       MambaMIM, TOKI, mask ratio 0.75 (the reference arm, the paper's setting)
    learnable75  one learnable mask token instead of TOKI, 0.75            (paper Table 9, "w/o TOKI")
    toki50       TOKI, mask ratio 0.5                                      (paper Table 8)
    toki90       TOKI, mask ratio 0.9                                      (paper Table 8)
    dense75      --no-bottom-up: the CNN sees the masked input densely     (paper Table 9, "w/o bottom-up")

Stages (each resumable; rerunning a stage skips finished work):

    data      synthetic phantoms (unlabelled pool + labelled set) + the real CT, prepared into two caches
    train     a queue of jobs run as `mambamim` subprocesses, several at once on one device:
              pretrain per arm -> finetune per arm and fold (k-fold CV) -> evaluate each fold's last.pt on
              its held-out cases (-> reconstruct PNG per pre-trained arm). --deadline stops the jobs
              cleanly (SIGTERM: they checkpoint) before a time limit; the next call resumes them.
    collect   per-case CSV + results.json: Dice / HD95 per class and arm (mean, std over all cases of all
              folds), paired Wilcoxon and t-test p-values (mambamim.evaluation.stats)
    report    figure of Dice per class per arm, docs/REPLICATION.md from REPLICATION.template.md
              (needs matplotlib; run it anywhere the collected results are)
    status    progress of every job;  pack: a tar.gz of the results and logs (no checkpoints or data)
    all       data + train + collect (+ report when matplotlib is there)

    python benchmarks/replication/replicate.py --scale micro all            # CPU, about 2-3 minutes
    bash benchmarks/replication/run_gpu.sh 1 && bash benchmarks/replication/run_gpu.sh 2   # GPU, two calls

Only the standard library is imported at the top: the driver runs where torch is, and `report` runs
where matplotlib is.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
REAL_CT = HERE / "data" / "ct_abdomen_3mm.nii.gz"
TEMPLATE = HERE / "REPLICATION.template.md"
PAPER = HERE / "paper_numbers.json"
DOC = REPO / "docs" / "REPLICATION.md"


# ------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    pretrain: tuple[str, ...] | None  # extra `mambamim pretrain` options; None = no pre-training
    paper: str  # the paper's row this arm stands for


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("scratch", "scratch", None, "w/o pretrained (Table 2, 8, 9)"),
    Arm("toki75", "TOKI, mask 0.75", ("--token", "toki", "--mask-ratio", "0.75"), "MambaMIM / mask 75 %"),
    Arm("learnable75", "learnable token, 0.75", ("--token", "learnable", "--mask-ratio", "0.75"), "w/o TOKI (Table 9)"),
    Arm("toki50", "TOKI, mask 0.5", ("--token", "toki", "--mask-ratio", "0.5"), "mask 50 % (Table 8)"),
    Arm("toki90", "TOKI, mask 0.9", ("--token", "toki", "--mask-ratio", "0.9"), "mask 90 % (Table 8)"),
    Arm("dense75", "dense CNN (no bottom-up), 0.75",
        ("--token", "toki", "--mask-ratio", "0.75", "--no-bottom-up"), "w/o bottom-up masking (Table 9)"),
)}
REFERENCE = "toki75"
# Two GPU calls of at most 9 minutes: each part is self-contained (its own pre-training and fine-tuning).
# "all": every arm in one call, with fewer steps (--set), when device time allows only one call.
PARTS: dict[str, tuple[str, ...]] = {"1": ("scratch", "toki75", "learnable75"), "2": ("toki50", "toki90", "dense75"),
                                     "all": tuple(ARMS),
                                     # the ablations alone, when scratch and toki75 are already in the results
                                     "3": ("learnable75", "toki50", "toki90", "dense75")}


@dataclass(frozen=True)
class Scale:
    """Every size of a replication run (saved with the results)."""

    name: str
    num_unlabelled: int  # synthetic phantoms in the pre-training pool (the real CT is added when present)
    num_labelled: int  # labelled phantoms, split into `folds` folds
    folds: int
    synth_inplane_voxels: tuple[int, int]
    synth_inplane_spacing: tuple[float, float]
    synth_slice_spacing: tuple[float, float]
    spacing: float  # preprocessing voxel size in mm
    crop: int
    model: str
    size: str
    decoder_width: int | None
    pretrain_steps: int
    pretrain_batch: int
    pretrain_crops: int
    pretrain_lr: float
    finetune_iterations: int
    finetune_batch: int
    finetune_crops: int
    finetune_lr: float
    val_every: int  # validation on the held-out fold during fine-tuning: monitoring only (last.pt is scored)
    overlap: float
    jobs: int  # concurrent jobs on the one device
    workers: int  # data-loading processes per training job
    log_every: int
    checkpoint_steps: int
    reconstruct: bool
    default_arms: tuple[str, ...] = tuple(ARMS)  # without --arms / --part
    seed: int = 0
    data_seed_unlabelled: int = 1000
    data_seed_labelled: int = 2000


SCALES: dict[str, Scale] = {
    # CPU smoke test of every stage: seconds per job, numbers meaningless.
    "micro": Scale(
        name="micro", num_unlabelled=6, num_labelled=4, folds=2,
        synth_inplane_voxels=(56, 72), synth_inplane_spacing=(5.0, 6.0), synth_slice_spacing=(6.0, 8.0),
        spacing=6.0, crop=32, model="hymamba", size="tiny", decoder_width=32,
        pretrain_steps=2, pretrain_batch=2, pretrain_crops=2, pretrain_lr=1e-3,
        finetune_iterations=2, finetune_batch=2, finetune_crops=2, finetune_lr=5e-3,
        val_every=0, overlap=0.25, jobs=2, workers=0, log_every=1, checkpoint_steps=0, reconstruct=True,
        # three arms cover every code path (scratch, bottom-up TOKI, dense); --arms ... runs all six
        default_arms=("scratch", "toki75", "dense75")),
    # One H200 (or H100), two calls of at most 9 minutes (see docs/REPLICATION.md for the budget).
    "gpu": Scale(
        name="gpu", num_unlabelled=224, num_labelled=20, folds=5,
        synth_inplane_voxels=(96, 128), synth_inplane_spacing=(2.5, 3.5), synth_slice_spacing=(3.0, 5.0),
        spacing=3.0, crop=64, model="hymamba", size="small", decoder_width=None,
        pretrain_steps=1200, pretrain_batch=8, pretrain_crops=4, pretrain_lr=1e-3,
        finetune_iterations=600, finetune_batch=4, finetune_crops=2, finetune_lr=1e-3,
        val_every=300, overlap=0.5, jobs=6, workers=2, log_every=25, checkpoint_steps=200, reconstruct=True),
}


# ------------------------------------------------------------------------------------------ helpers


def log(msg: str) -> None:
    print(f"[replicate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def mambamim_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mambamim", *args]


def run_checked(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(True)[-15:])
        raise SystemExit(f"command failed (rc={rc}): {' '.join(cmd)}\n--- {log_path} (tail) ---\n{tail}")


def metrics_progress(run: Path) -> tuple[int, float | None, float | None]:
    """(last training step, sec/step of the last logged window, last training loss) from RUN/metrics.csv."""
    path = run / "metrics.csv"
    step, sec, loss = 0, None, None
    if not path.is_file():
        return step, sec, loss
    try:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                lv = row.get("loss") or row.get("train/loss") or ""
                if not lv:
                    continue
                try:
                    step = max(step, int(float(row["step"])))
                    loss = float(lv)
                    sv = row.get("sec_per_step") or row.get("train/sec_per_step") or ""
                    sec = float(sv) if sv else sec
                except (KeyError, ValueError):
                    continue
    except OSError:
        pass
    return step, sec, loss


def metric_curve(run: Path, *columns: str) -> list[tuple[int, float]]:
    """(step, value) of RUN/metrics.csv rows where the first of ``columns`` present holds a number."""
    out = []
    path = run / "metrics.csv"
    if path.is_file():
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                value = next((row[c] for c in columns if row.get(c)), "")
                try:
                    out.append((int(float(row["step"])), float(value)))
                except (KeyError, ValueError):
                    continue
    return out


def loss_curve(run: Path) -> list[tuple[int, float]]:
    return metric_curve(run, "loss", "train/loss")


def val_curve(run: Path) -> list[tuple[int, float]]:
    return metric_curve(run, "val_mean_dice")


def read_calls(root: Path) -> list[dict]:
    """ROOT/settings.json: one entry per train call (a single dict in older roots)."""
    data = read_json(root / "settings.json", []) or []
    return [data] if isinstance(data, dict) else list(data)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cpu"):
        return "cpu"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip()
        if out:
            return out.splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "cpu" if device == "auto" else device


def environment(device: str) -> dict[str, Any]:
    info = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "host_cpus": os.cpu_count(),
            "python": sys.version.split()[0], "device": device, "card": device_name(device), "commit": git_commit()}
    try:
        out = subprocess.run([sys.executable, "-c", "import torch, monai; print(torch.__version__, monai.__version__)"],
                             capture_output=True, text=True, timeout=120).stdout.split()
        info["torch"], info["monai"] = (out + ["?", "?"])[:2]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# ------------------------------------------------------------------------------------------ layout


@dataclass
class Layout:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def pool_cache(self) -> Path:
        return self.data / "cache_pool"

    @property
    def lab_cache(self) -> Path:
        return self.data / "cache_labelled"

    def pretrain(self, arm: str) -> Path:
        return self.root / "pretrain" / arm

    def finetune(self, arm: str, fold: int) -> Path:
        return self.root / "finetune" / arm / f"fold{fold}"

    def evaluation(self, arm: str, fold: int) -> Path:
        return self.root / "eval" / arm / f"fold{fold}"

    def recon(self, arm: str) -> Path:
        return self.root / "figures" / f"reconstruction_{arm}.png"

    def state(self, job: str) -> Path:
        return self.root / "state" / f"{job.replace(':', '_')}.json"

    def log(self, job: str) -> Path:
        return self.root / "logs" / f"{job.replace(':', '_')}.log"


# ------------------------------------------------------------------------------------------ data


def stage_data(scale: Scale, lay: Layout, device: str) -> dict[str, Any]:
    """Synthesise both phantom sets, add the real CT to the pool, prepare both caches (idempotent)."""
    done = lay.data / "data.json"
    meta = read_json(done)
    if meta and meta.get("scale") == asdict(scale)["name"] and (lay.pool_cache / "dataset.json").is_file() \
            and (lay.lab_cache / "dataset.json").is_file():
        log(f"data: ready ({meta['pool_volumes']} unlabelled, {meta['labelled_volumes']} labelled) in {lay.data}")
        return meta
    t0 = time.perf_counter()
    cpus = os.cpu_count() or 1
    lay.data.mkdir(parents=True, exist_ok=True)
    dlog = lay.root / "logs" / "data.log"
    synth = ["--inplane-voxels", *map(str, scale.synth_inplane_voxels),
             "--inplane-spacing", *map(str, scale.synth_inplane_spacing),
             "--slice-spacing", *map(str, scale.synth_slice_spacing)]
    raw_pool, raw_lab = lay.data / "raw_pool", lay.data / "raw_labelled"
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    if not (raw_pool / "dataset.json").is_file():
        run_checked(mambamim_cmd("data", "synth", "--out", str(raw_pool), "--num", str(scale.num_unlabelled),
                                 "--seed", str(scale.data_seed_unlabelled), "--unlabeled", "--prefix", "pool",
                                 "--workers", str(min(cpus, 16)), *synth), dlog)
    if not (raw_lab / "dataset.json").is_file():
        run_checked(mambamim_cmd("data", "synth", "--out", str(raw_lab), "--num", str(scale.num_labelled),
                                 "--seed", str(scale.data_seed_labelled), "--prefix", "lab",
                                 "--workers", str(min(cpus, 16)), *synth), dlog)
    seconds["synth"] = round(time.perf_counter() - t, 1)
    # The pool: the synthetic dataset.json's training list plus the real CT (images only: labels unused).
    ds = read_json(raw_pool / "dataset.json")
    training = [{"image": e["image"]} if isinstance(e, dict) else {"image": e} for e in ds["training"]]
    real_ct = REAL_CT.is_file()
    if real_ct:
        training.append({"image": os.path.relpath(REAL_CT, raw_pool)})
    else:
        log(f"data: the real CT {REAL_CT} is missing: the pool is synthetic only")
    pool_json = raw_pool / "pool.json"
    write_json(pool_json, {**{k: v for k, v in ds.items() if k not in ("training", "synthetic")},
                           "name": "replication pre-training pool", "labels": {"0": "background"},
                           "numTraining": len(training), "training": training})
    prep = ["--spacing", str(scale.spacing), "--min-size", str(scale.crop), "--workers", str(min(cpus, 16)),
            "--no-progress", "--strict"]
    t = time.perf_counter()
    run_checked(mambamim_cmd("data", "prepare", "--input", str(pool_json), "--out", str(lay.pool_cache), *prep), dlog)
    run_checked(mambamim_cmd("data", "prepare", "--input", str(raw_lab), "--out", str(lay.lab_cache), *prep), dlog)
    seconds["prepare"] = round(time.perf_counter() - t, 1)
    pool_n = len(read_json(lay.pool_cache / "dataset.json")["cases"])
    lab_n = len(read_json(lay.lab_cache / "dataset.json")["cases"])
    seconds["total"] = round(time.perf_counter() - t0, 1)
    meta = {"scale": scale.name, "pool_volumes": pool_n, "real_ct_in_pool": real_ct, "labelled_volumes": lab_n,
            "spacing_mm": scale.spacing, "min_size": scale.crop, "seconds": seconds}
    write_json(done, meta)
    log(f"data: {pool_n} unlabelled volumes (real CT: {'yes' if real_ct else 'no'}), {lab_n} labelled, "
        f"in {seconds['total']:.1f} s (synth {seconds['synth']} s, prepare {seconds['prepare']} s)")
    return meta


# ------------------------------------------------------------------------------------------ jobs


@dataclass
class Job:
    name: str  # kind:arm[:fold]
    kind: str  # pretrain | finetune | evaluate | reconstruct
    arm: str
    fold: int | None
    deps: list[str]
    target: int  # steps of a training job (0 otherwise)
    run: Path  # the run / output folder
    is_done: Callable[[], bool] = field(repr=False)
    command: Callable[[bool], list[str]] = field(repr=False)  # resume -> argv
    resumable: bool = False


def build_jobs(scale: Scale, lay: Layout, arms: list[str], device: str, workers: int) -> list[Job]:
    """Every job the arms need, in priority order (pre-training first: it is on the critical path)."""
    jobs: list[Job] = []
    common = ["--model", scale.model, "--size", scale.size, "--crop", str(scale.crop), "--seed", str(scale.seed),
              "--device", device, "--workers", str(workers), "--no-progress", "--log-every", str(scale.log_every)]
    if scale.checkpoint_steps:
        common += ["--checkpoint-steps", str(scale.checkpoint_steps)]
    resume_args = ["--device", device, "--workers", str(workers), "--no-progress"]

    def training_done(run: Path, target: int, product: Path) -> Callable[[], bool]:
        return lambda: product.is_file() and metrics_progress(run)[0] >= target

    for arm in arms:
        a = ARMS[arm]
        if a.pretrain is None:
            continue
        run = lay.pretrain(arm)
        argv = ["pretrain", "--data", str(lay.pool_cache), "--out", str(run), *common,
                "--batch-size", str(scale.pretrain_batch), "--num-crops", str(scale.pretrain_crops),
                "--steps", str(scale.pretrain_steps), "--lr", str(scale.pretrain_lr),
                "--warmup-steps", str(max(1, scale.pretrain_steps // 20)), "--save-every", "0", "--vis-every", "0",
                *a.pretrain]
        if scale.decoder_width:
            argv += ["--decoder-width", str(scale.decoder_width)]
        jobs.append(Job(f"pretrain:{arm}", "pretrain", arm, None, [], scale.pretrain_steps, run,
                        training_done(run, scale.pretrain_steps, run / "encoder.pt"),
                        lambda resume, argv=argv, run=run: mambamim_cmd(
                            *(["pretrain", "--resume", str(run), *resume_args] if resume else argv)),
                        resumable=True))
    # scratch first among the fine-tunes: it needs no pre-training and can use the device meanwhile
    for arm in sorted(arms, key=lambda x: ARMS[x].pretrain is not None):
        a = ARMS[arm]
        for k in range(scale.folds):
            run = lay.finetune(arm, k)
            argv = ["finetune", "--data", str(lay.lab_cache), "--out", str(run), *common,
                    "--batch-size", str(scale.finetune_batch), "--num-crops", str(scale.finetune_crops),
                    "--iterations", str(scale.finetune_iterations), "--lr", str(scale.finetune_lr),
                    "--warmup-steps", str(max(1, scale.finetune_iterations // 20)),
                    "--val-every", str(scale.val_every), "--fold", str(k), "--num-folds", str(scale.folds),
                    "--overlap", str(scale.overlap)]
            deps = []
            if a.pretrain is not None:
                argv += ["--pretrained", str(lay.pretrain(arm) / "encoder.pt")]
                deps = [f"pretrain:{arm}"]
            jobs.append(Job(f"finetune:{arm}:{k}", "finetune", arm, k, deps, scale.finetune_iterations, run,
                            training_done(run, scale.finetune_iterations, run / "checkpoints" / "last.pt"),
                            lambda resume, argv=argv, run=run: mambamim_cmd(
                                *(["finetune", "--resume", str(run), *resume_args] if resume else argv)),
                            resumable=True))
            ev = lay.evaluation(arm, k)

            def eval_cmd(resume: bool, run: Path = run, ev: Path = ev) -> list[str]:
                val = read_json(run / "split.json", {}).get("validation") or []
                if not val:
                    raise RuntimeError(f"{run}/split.json lists no validation case")
                return mambamim_cmd("evaluate", "--checkpoint", str(run / "checkpoints" / "last.pt"),
                                    "--data", str(lay.lab_cache), "--out", str(ev), "--cases", *val,
                                    "--overlap", str(scale.overlap), "--device", device, "--no-progress")

            jobs.append(Job(f"evaluate:{arm}:{k}", "evaluate", arm, k, [f"finetune:{arm}:{k}"], 0, ev,
                            lambda ev=ev: (ev / "per_case.csv").is_file(), eval_cmd))
    if scale.reconstruct:
        first = sorted((lay.data / "raw_pool" / "imagesTr").glob("*.nii.gz"))
        src = REAL_CT if REAL_CT.is_file() else (first[0] if first else REAL_CT)
        for arm in arms:
            if ARMS[arm].pretrain is None:
                continue
            png = lay.recon(arm)
            jobs.append(Job(f"reconstruct:{arm}", "reconstruct", arm, None, [f"pretrain:{arm}"], 0, png.parent,
                            lambda png=png: png.is_file(),
                            lambda resume, arm=arm, png=png: mambamim_cmd(
                                "reconstruct", "--checkpoint", str(lay.pretrain(arm)), "--input", str(src),
                                "--out", str(png), "--crop", str(max(scale.crop, 64)), "--device", device)))
    return jobs


def needed_jobs(jobs: list[Job]) -> tuple[list[Job], set[str]]:
    """Jobs still to run, and the names counted as done. A job is not needed when it is done or when
    everything that depends on it is done (an evaluated fold needs its fine-tuning no more, a fully
    evaluated arm its pre-training no more: results carried from an earlier call suffice)."""
    by_name = {j.name: j for j in jobs}
    done = {j.name for j in jobs if j.is_done()}
    users: dict[str, list[str]] = {j.name: [] for j in jobs}
    for j in jobs:
        for d in j.deps:
            users.setdefault(d, []).append(j.name)
    changed = True
    while changed:
        changed = False
        for name in list(by_name):
            if name not in done and users.get(name) and all(u in done for u in users[name]):
                done.add(name)
                changed = True
    return [j for j in jobs if j.name not in done], done


class Runner:
    """Runs jobs as subprocesses, at most `jobs` at a time, until all are done or the deadline."""

    def __init__(self, lay: Layout, scale: Scale, jobs: int, deadline: float | None, min_start: float,
                 progress_every: float, max_attempts: int = 2) -> None:
        self.lay, self.scale, self.max_jobs = lay, scale, jobs
        self.deadline, self.min_start, self.progress_every = deadline, min_start, progress_every
        self.max_attempts = max_attempts
        self.t0 = time.time()

    def time_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.time()

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        threads = max(1, (os.cpu_count() or 1) // max(1, self.max_jobs))
        env.setdefault("OMP_NUM_THREADS", str(threads))
        src = str(REPO / "src")
        if src not in env.get("PYTHONPATH", "").split(os.pathsep):
            env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), src) if p)
        return env

    def _launch(self, job: Job) -> subprocess.Popen:
        st = read_json(self.lay.state(job.name), {}) or {}
        resume = job.resumable and (job.run / "checkpoints" / "last.pt").is_file()
        argv = job.command(resume)
        if job.resumable and not resume and (job.run / "config.yaml").is_file():
            argv.append("--overwrite")  # started before but never checkpointed: start over
        lp = self.lay.log(job.name)
        lp.parent.mkdir(parents=True, exist_ok=True)
        f = lp.open("a")
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {st.get('attempts', 0) + 1}: {' '.join(argv)}\n")
        f.flush()
        # same process group as the driver: a Ctrl-C or the end of a device call reaches the jobs too
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=self._env())
        proc._log = f  # type: ignore[attr-defined]
        proc._t0 = time.time()  # type: ignore[attr-defined]
        st.update({"job": job.name, "status": "running", "attempts": st.get("attempts", 0) + (0 if resume else 1),
                   "resumes": st.get("resumes", 0) + (1 if resume else 0), "argv": argv})
        write_json(self.lay.state(job.name), st)
        log(f"start {job.name}{' (resume)' if resume else ''}")
        return proc

    def _finish(self, job: Job, proc: subprocess.Popen, stopped: bool) -> str:
        proc._log.close()  # type: ignore[attr-defined]
        wall = time.time() - proc._t0  # type: ignore[attr-defined]
        st = read_json(self.lay.state(job.name), {}) or {}
        st["seconds"] = round(st.get("seconds", 0.0) + wall, 1)
        st["rc"] = proc.returncode
        if job.is_done():
            st["status"] = "done"
        elif stopped or proc.returncode == 130:
            st["status"] = "interrupted"
        else:
            st["status"] = "failed"
            st["failures"] = st.get("failures", 0) + 1
        if job.target:
            step, sec, loss = metrics_progress(job.run)
            st.update({"step": step, "target": job.target, "sec_per_step": sec, "loss": loss})
        write_json(self.lay.state(job.name), st)
        extra = f" at step {st.get('step')}/{job.target}" if job.target and st["status"] != "done" else ""
        log(f"{st['status']} {job.name} (rc={proc.returncode}, {wall:.0f} s){extra}")
        if st["status"] == "failed":
            tail = "".join(self.lay.log(job.name).read_text(errors="replace").splitlines(True)[-12:])
            print(f"--- {self.lay.log(job.name)} (tail) ---\n{tail}---", flush=True)
        return st["status"]

    def _stop_all(self, running: dict[str, tuple[Job, subprocess.Popen]], grace: float = 45.0) -> None:
        for job, proc in running.values():
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)  # the training loop checkpoints and exits with 130
                except ProcessLookupError:
                    pass
        end = time.time() + grace
        while time.time() < end and any(p.poll() is None for _, p in running.values()):
            time.sleep(0.5)
        for job, proc in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self._finish(job, proc, stopped=True)
        running.clear()

    def progress(self, jobs: list[Job], running: dict[str, tuple[Job, subprocess.Popen]], done: set[str]) -> None:
        elapsed = time.time() - self.t0
        left = self.time_left()
        parts = [f"{len(done)}/{len(jobs)} jobs done, {len(running)} running, {elapsed:.0f} s elapsed"
                 + ("" if math.isinf(left) else f", {left:.0f} s to the deadline")]
        for job, proc in running.values():
            if job.target:
                step, sec, loss = metrics_progress(job.run)
                eta = f", eta {(job.target - step) * sec:.0f} s" if sec else ""
                ls = f", loss {loss:.4f}" if loss is not None else ""
                parts.append(f"  {job.name}: {step}/{job.target} steps, "
                             f"{sec if sec is None else round(sec, 3)} s/step{ls}{eta}")
            else:
                parts.append(f"  {job.name}: {time.time() - proc._t0:.0f} s")  # type: ignore[attr-defined]
        log("\n".join(parts))

    def run(self, all_jobs: list[Job]) -> dict[str, Any]:
        todo, done = needed_jobs(all_jobs)
        failed: set[str] = set()
        running: dict[str, tuple[Job, subprocess.Popen]] = {}
        last_progress = 0.0
        log(f"train: {len(todo)} job(s) to run, {len(done)} done already; up to {self.max_jobs} at once")
        stopped = False
        try:
            while todo or running:
                if self.time_left() <= 0:
                    log("deadline reached: stopping the running jobs (they checkpoint and resume next time)")
                    self._stop_all(running)
                    stopped = True
                    break
                for name, (job, proc) in list(running.items()):
                    if proc.poll() is not None:
                        del running[name]
                        status = self._finish(job, proc, stopped=False)
                        if status == "done":
                            done.add(name)
                        elif status == "failed":
                            st = read_json(self.lay.state(name), {})
                            if st.get("failures", 0) >= self.max_attempts:
                                failed.add(name)
                                log(f"giving up on {name} after {st.get('failures')} failures")
                            else:
                                todo.insert(0, job)
                        else:
                            todo.insert(0, job)
                blocked = {j.name for j in todo if any(d in failed for d in j.deps)}
                for name in blocked:
                    failed.add(name)
                todo = [j for j in todo if j.name not in failed]
                for job in list(todo):
                    if len(running) >= self.max_jobs:
                        break
                    if all(d in done for d in job.deps) and job.name not in running:
                        if job.target and self.time_left() < self.min_start:
                            continue
                        todo.remove(job)
                        try:
                            running[job.name] = (job, self._launch(job))
                        except RuntimeError as exc:
                            log(f"cannot start {job.name}: {exc}")
                            failed.add(job.name)
                if not running and todo and not any(all(d in done for d in j.deps) for j in todo):
                    break  # nothing can start (dependencies failed)
                if not running and todo and self.time_left() < self.min_start:
                    log("too little time left to start another training job")
                    stopped = True
                    break
                if time.time() - last_progress >= self.progress_every and running:
                    self.progress(all_jobs, running, done)
                    last_progress = time.time()
                time.sleep(0.5)
        except KeyboardInterrupt:
            log("interrupted: stopping the running jobs")
            self._stop_all(running)
            raise
        remaining = [j.name for j in all_jobs if j.name not in done]
        log(f"train: {len(done)}/{len(all_jobs)} jobs done in {time.time() - self.t0:.0f} s"
            + (f"; not done: {', '.join(remaining[:12])}{' ...' if len(remaining) > 12 else ''}" if remaining else "")
            + (f"; failed: {', '.join(sorted(failed))}" if failed else ""))
        return {"done": sorted(done), "remaining": remaining, "failed": sorted(failed), "stopped": stopped,
                "seconds": round(time.time() - self.t0, 1)}


def stage_train(scale: Scale, lay: Layout, arms: list[str], device: str, jobs: int, workers: int,
                deadline: float | None, min_start: float, progress_every: float) -> dict[str, Any]:
    all_jobs = build_jobs(scale, lay, arms, device, workers)
    calls = read_calls(lay.root)
    calls.append({"scale": asdict(scale), "arms": arms, "device": device, "jobs": jobs, "workers": workers})
    write_json(lay.root / "settings.json", calls)
    envs = read_json(lay.root / "environment.json", []) or []
    envs.append({**environment(device), "arms": arms})
    write_json(lay.root / "environment.json", envs)
    runner = Runner(lay, scale, jobs, deadline, min_start, progress_every)
    result = runner.run(all_jobs)
    timings = read_json(lay.root / "timings.json", {}) or {}
    timings.setdefault("train_calls", []).append({"arms": arms, **{k: result[k] for k in ("seconds", "stopped")},
                                                  "done": len(result["done"]), "jobs": len(all_jobs)})
    write_json(lay.root / "timings.json", timings)
    return result


def stage_status(scale: Scale, lay: Layout, arms: list[str]) -> bool:
    jobs = build_jobs(scale, lay, arms, "auto", scale.workers)
    todo, done = needed_jobs(jobs)
    print(f"{lay.root}: {len(done)}/{len(jobs)} jobs done")
    for j in jobs:
        st = read_json(lay.state(j.name), {}) or {}
        status = "done" if j.name in done else st.get("status", "pending")
        extra = ""
        if j.target:
            step, sec, loss = metrics_progress(j.run)
            extra = f"  {step}/{j.target} steps" + (f", {sec:.3f} s/step" if sec else "") + \
                (f", loss {loss:.4f}" if loss is not None else "")
        secs = f"  {st['seconds']:.0f} s" if st.get("seconds") else ""
        print(f"  {j.name:28s} {status:12s}{secs}{extra}")
    return not todo


# ------------------------------------------------------------------------------------------ collect


def _mean_std(vals: list[float]) -> tuple[float, float, int]:
    v = [x for x in vals if isinstance(x, float) and math.isfinite(x)]
    if not v:
        return math.nan, math.nan, 0
    m = sum(v) / len(v)
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / len(v)), len(v)


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def stage_collect(scale: Scale, lay: Layout, arms: list[str], out: Path) -> dict[str, Any]:
    """Merge each arm's fold evaluations, summarise, test, and write results.json + per_case.csv."""
    from mambamim.evaluation.metrics import MetricTable
    from mambamim.evaluation.stats import compare_tables

    warnings: list[str] = []
    calls = read_calls(lay.root)
    used = {json.dumps(c["scale"], sort_keys=True) for c in calls}
    if len(used) > 1:
        warnings.append("the train calls used different settings (see settings.json): the arms may not be comparable")
    if calls:
        recorded = Scale(**{k: tuple(v) if isinstance(v, list) else v for k, v in calls[-1]["scale"].items()})
        if recorded != scale:
            log("collect: using the settings the last train call recorded (settings.json), not the preset's")
            scale = recorded

    tables: dict[str, Any] = {}
    folds_of: dict[str, list[int]] = {}
    case_fold: dict[str, int] = {}
    splits: dict[str, Any] = {}
    for arm in arms:
        merged = None
        for k in range(scale.folds):
            path = lay.evaluation(arm, k) / "per_case.csv"
            if not path.is_file():
                continue
            t = MetricTable.from_csv(path)
            for r in t.rows:
                case_fold[str(r["case"])] = k
            if merged is None:
                merged = MetricTable(class_names=list(t.class_names))
            merged.rows.extend(t.rows)
            folds_of.setdefault(arm, []).append(k)
            sp = read_json(lay.finetune(arm, k) / "split.json")
            if sp and k not in splits:
                splits[k] = {"train": sp.get("train"), "validation": sp.get("validation")}
        if merged is not None:
            tables[arm] = merged
    if not tables:
        raise SystemExit(f"collect: no evaluation found under {lay.root / 'eval'}")
    classes = list(next(iter(tables.values())).class_names)
    summary: dict[str, Any] = {}
    for arm, t in tables.items():
        entry: dict[str, Any] = {"classes": {}, "folds": folds_of[arm], "cases": len(t.rows)}
        for c in classes:
            e = {}
            for m in ("dice", "hd95"):
                mean, std, n = _mean_std(t.values(m, c))
                e.update({f"{m}_mean": mean, f"{m}_std": std, f"{m}_n": n})
            entry["classes"][c] = e
        e = {}
        for m in ("dice", "hd95"):  # per-case mean over classes, then mean / std over cases
            mean, std, n = _mean_std(t.values(m, "mean"))
            e.update({f"{m}_mean": mean, f"{m}_std": std, f"{m}_n": n})
        entry["mean"] = e
        summary[arm] = entry
    pairs = [("scratch", a) for a in arms if a != "scratch"]
    pairs += [(REFERENCE, a) for a in arms if a not in ("scratch", REFERENCE)]
    comparisons = []
    for a, b in pairs:
        if a not in tables or b not in tables:
            continue
        shared, results = compare_tables(tables[a], tables[b], metrics=("dice", "hd95"))
        for r in results:
            comparisons.append({"a": a, "b": b, "class": r.class_name, "metric": r.metric, "n": r.n,
                                "mean_a": r.mean_a, "mean_b": r.mean_b, "diff": r.mean_diff,
                                "p_ttest": r.p_ttest, "p_wilcoxon": r.p_wilcoxon})
    training: dict[str, Any] = {"pretrain": {}, "finetune": {}}
    for arm in arms:
        if ARMS[arm].pretrain is not None:
            curve = loss_curve(lay.pretrain(arm))
            st = read_json(lay.state(f"pretrain:{arm}"), {}) or {}
            if curve:
                k = max(1, len(curve) // 10)
                first = sum(v for _, v in curve[:k]) / k
                last = sum(v for _, v in curve[-k:]) / k
                training["pretrain"][arm] = {"steps": curve[-1][0], "loss_first": first, "loss_last": last,
                                             "sec_per_step": metrics_progress(lay.pretrain(arm))[1],
                                             "seconds": st.get("seconds"), "curve": curve}
        folds = {}
        for k in range(scale.folds):
            run = lay.finetune(arm, k)
            curve = loss_curve(run)
            if not curve:
                continue
            st = read_json(lay.state(f"finetune:{arm}:{k}"), {}) or {}
            load = read_json(run / "encoder_load_report.json")
            folds[str(k)] = {"steps": curve[-1][0], "loss_last": curve[-1][1], "val": val_curve(run),
                             "sec_per_step": metrics_progress(run)[1], "seconds": st.get("seconds"),
                             "encoder_load": {kk: load.get(kk) for kk in ("loaded", "missing", "unexpected",
                                                                           "num_loaded", "summary") if kk in load}
                             if isinstance(load, dict) else None}
        training["finetune"][arm] = folds
    jobs_time: dict[str, float] = {}
    for p in sorted((lay.root / "state").glob("*.json")):
        st = read_json(p, {}) or {}
        if st.get("seconds"):
            jobs_time[st.get("job", p.stem)] = st["seconds"]
    results = {
        "generated": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "scale": asdict(scale),
        "arms": {a: {**asdict(ARMS[a]), "evaluated_folds": folds_of.get(a, []),
                     "cases": summary.get(a, {}).get("cases", 0)} for a in arms},
        "reference": REFERENCE,
        "classes": classes,
        "data": read_json(lay.data / "data.json"),
        "splits": {str(k): v for k, v in sorted(splits.items())},
        "summary": summary,
        "comparisons": comparisons,
        "training": training,
        "timings": {**(read_json(lay.root / "timings.json", {}) or {}), "jobs": jobs_time},
        "environment": read_json(lay.root / "environment.json", []),
        "warnings": warnings,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", _clean(results))
    with (out / "per_case.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "fold", "case", "class", "dice", "hd95", "nsd"])
        for arm, t in tables.items():
            for r in t.rows:
                cid = str(r["case"])
                for c in classes + ["mean"]:
                    w.writerow([arm, case_fold.get(cid, ""), cid, c] +
                               [repr(float(r.get(f"{m}_{c}", math.nan))) for m in ("dice", "hd95", "nsd")])
    for arm in tables:
        m = summary[arm]["mean"]
        c = next((x for x in comparisons if x["a"] == "scratch" and x["b"] == arm and x["class"] == "mean"
                  and x["metric"] == "dice"), None)
        vs = "" if c is None else f", vs scratch {c['diff']:+.4f} (Wilcoxon p {_p(c['p_wilcoxon'])}, n {c['n']})"
        log(f"collect: {arm:12s} mean Dice {_f(m['dice_mean'], 4)} ± {_f(m['dice_std'], 4)}, "
            f"HD95 {_f(m['hd95_mean'], 1)} mm over {summary[arm]['cases']} cases{vs}")
    missing = [a for a in arms if len(folds_of.get(a, [])) < scale.folds]
    log(f"collect: {len(tables)} arm(s), {sum(len(t.rows) for t in tables.values())} case evaluations -> "
        f"{out / 'results.json'}, {out / 'per_case.csv'}"
        + (f"; incomplete arms: {', '.join(missing)}" if missing else ""))
    return results


# ------------------------------------------------------------------------------------------ report


def _f(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _p(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.1e}" if v < 1e-3 else f"{v:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _not_run(res: dict) -> str:
    missing = [a for a in ARMS if a not in res["arms"]]
    return (" **Not run:** " + ", ".join(missing) + " (no fold evaluated; see the note below the verdicts).") if missing else ""


def _class_key(name: str) -> str:
    """per_case.csv names classes with underscores (right_kidney), the paper's columns with spaces."""
    return name.replace("_", " ")


PAPER_COLUMNS = {"Spl": ["spleen"], "Kid": ["right kidney", "left kidney"], "Gall": ["gallbladder"],
                 "Eso": ["esophagus"], "Liv": ["liver"], "Sto": ["stomach"], "Aor": ["aorta"],
                 "IVC": ["inferior vena cava"], "Veins": ["portal and splenic vein"], "Pan": ["pancreas"],
                 "AG": ["right adrenal gland", "left adrenal gland"]}

# The paper's claims as (arm B, arm A, the paper's mean Dice of B and of A in %): B beats A.
CLAIMS = [
    ("pre-training helps (MambaMIM vs scratch)", "toki75", "scratch", 80.16, 77.56, "Table 2 / 8"),
    ("TOKI beats a learnable mask token", "toki75", "learnable75", 80.16, 79.38, "Table 9"),
    ("mask 0.75 beats mask 0.5", "toki75", "toki50", 80.16, 79.78, "Table 8"),
    ("mask 0.75 beats mask 0.9", "toki75", "toki90", 80.16, 79.14, "Table 8"),
    ("bottom-up sparse masking beats a dense CNN on the masked input", "toki75", "dense75", 80.16, 79.20,
     "Table 9 (its row also drops skip and TOKI)"),
    ("learnable-token pre-training helps", "learnable75", "scratch", 79.38, 77.56, "Table 9"),
    ("mask-0.5 pre-training helps", "toki50", "scratch", 79.78, 77.56, "Table 8"),
    ("mask-0.9 pre-training helps", "toki90", "scratch", 79.14, 77.56, "Table 8"),
    ("dense-CNN pre-training helps", "dense75", "scratch", 79.20, 77.56, "Table 9"),
]


def _comparison(res: dict, a: str, b: str, cls: str = "mean", metric: str = "dice") -> dict | None:
    for c in res.get("comparisons", []):
        if c["class"] == cls and c["metric"] == metric and {c["a"], c["b"]} == {a, b}:
            if c["a"] == a:
                return c
            return {**c, "a": a, "b": b, "mean_a": c["mean_b"], "mean_b": c["mean_a"],
                    "diff": None if c["diff"] is None else -c["diff"]}
    return None


def verdict(diff: float | None, p: float | None, alpha: float = 0.05) -> str:
    """Our difference (B - A, paper: positive) and its Wilcoxon p-value -> words."""
    if diff is None or not math.isfinite(diff):
        return "not measured"
    sig = p is not None and math.isfinite(p) and p < alpha
    if diff > 0:
        return "reproduced (p < 0.05)" if sig else "same direction, not significant"
    if diff < 0:
        return "contradicted (opposite, p < 0.05)" if sig else "not reproduced (opposite direction, not significant)"
    return "no difference"


def render_sections(res: dict | None, paper: dict, fig_rel: str | None, results_rel: str) -> dict[str, str]:
    """The generated blocks of docs/REPLICATION.md (placeholders `{{name}}` of the template)."""
    s: dict[str, str] = {}
    cols = paper["columns"]
    s["paper_table2"] = _table(["HyMamba (Table 2)"] + cols,
                               [[k] + [f"{v:.2f}" for v in row] for k, row in paper["table2_hymamba"]["rows"].items()])
    s["paper_table8"] = _table(["mask ratio (Table 8)"] + cols,
                               [[k] + [f"{v:.2f}" for v in row] for k, row in paper["table8"]["rows"].items()])
    s["paper_table9"] = _table(["components (Table 9)"] + paper["table9"]["columns"],
                               [[k] + [v if isinstance(v, str) else f"{v:.2f}" for v in row]
                                for k, row in paper["table9"]["rows"].items()])
    if res is None:
        pending = ("*Not run yet.* Run the GPU calls of [Commands](#commands), then `collect` and `report`: "
                   "this block is generated from `results.json`.")
        for key in ("status", "setup", "main_table", "claims", "dice_table", "hd95_table", "comparisons",
                    "paper_vs_ours", "pretraining", "finetuning", "timings", "figure", "reconstructions"):
            s[key] = pending
        s["generated"] = "not run yet"
        return s
    sc = res["scale"]
    arms = [a for a in res["arms"] if a in res["summary"]]
    summ = res["summary"]
    classes = res["classes"]
    env = res.get("environment") or []
    cards = sorted({e.get("card", "?") for e in env})
    dates = sorted({(e.get("date") or "")[:10] for e in env if e.get("date")})
    data = res.get("data") or {}
    # the device runs a copy of the working tree whose .git may be stale: name the checkout that reports
    s["generated"] = (f"{res['generated']} from `{results_rel}/results.json` (scale `{sc['name']}`; report written at "
                      f"commit {git_commit()}, the runs used the working tree sent from that checkout)")
    incomplete = [a for a in res["arms"] if len(res["arms"][a]["evaluated_folds"]) < sc["folds"]]
    warn = "".join(f" **Warning:** {w}." for w in res.get("warnings") or [])
    s["status"] = (f"Scale `{sc['name']}`; run on {', '.join(cards) or '?'} on {', '.join(dates) or '?'} "
                   f"(torch {', '.join(sorted({str(e.get('torch')) for e in env})) or '?'}). "
                   + ("Every arm that ran has all folds evaluated." if not incomplete else
                      "**Incomplete:** " + ", ".join(
                          f"{a} ({len(res['arms'][a]['evaluated_folds'])}/{sc['folds']} folds)" for a in incomplete)
                      + ".") + _not_run(res) + warn)
    s["setup"] = _table(["what", "value"], [
        ["pre-training pool", f"{data.get('pool_volumes', '?')} volumes: {sc['num_unlabelled']} synthetic phantoms "
                              f"(seed {sc['data_seed_unlabelled']})"
                              + (" + the real abdomen CT" if data.get("real_ct_in_pool") else " (real CT absent)")],
        ["labelled set", f"{sc['num_labelled']} synthetic phantoms (seed {sc['data_seed_labelled']}), 13 organs; "
                         f"{sc['folds']}-fold cross-validation: each fold fine-tunes on "
                         f"{sc['num_labelled'] - sc['num_labelled'] // sc['folds']} and is scored on "
                         f"{sc['num_labelled'] // sc['folds']} held-out cases"],
        ["phantom geometry", f"in-plane {sc['synth_inplane_voxels'][0]}-{sc['synth_inplane_voxels'][1]} voxels at "
                             f"{sc['synth_inplane_spacing'][0]}-{sc['synth_inplane_spacing'][1]} mm, slices "
                             f"{sc['synth_slice_spacing'][0]}-{sc['synth_slice_spacing'][1]} mm"],
        ["preprocessing", f"{sc['spacing']} mm isotropic, HU [-175, 250] -> [0, 1], foreground crop, "
                          f"padded to >= {sc['crop']}^3"],
        ["network", f"`{sc['model']}` size `{sc['size']}`, crops {sc['crop']}^3"],
        ["pre-training", f"{sc['pretrain_steps']} steps, batch {sc['pretrain_batch']} crops "
                         f"({sc['pretrain_crops']} per volume), AdamW lr {sc['pretrain_lr']:g}, 5 % warm-up, cosine, "
                         f"decoder width {sc['decoder_width'] or 'default'}, seed {sc['seed']}"],
        ["fine-tuning", f"{sc['finetune_iterations']} iterations, batch {sc['finetune_batch']} crops "
                        f"({sc['finetune_crops']} per volume), AdamW lr {sc['finetune_lr']:g}, 5 % warm-up, cosine, "
                        f"Dice + CE, augmentation on, seed {sc['seed']}; the same for every arm"],
        ["scoring", f"`mambamim evaluate` of each fold's **last.pt** on its held-out cases (sliding window, "
                    f"overlap {sc['overlap']}); validation during fine-tuning "
                    f"({'every ' + str(sc['val_every']) + ' iterations' if sc['val_every'] else 'off'}) is "
                    "monitoring only, so no checkpoint is selected on the test cases"],
        ["concurrency", f"{sc['jobs']} jobs at once on the one device, {sc['workers']} loader workers each"],
    ])

    def dice_cell(arm: str, c: str, m: str = "dice", d: int = 3) -> str:
        e = summ[arm]["classes"][c] if c != "mean" else summ[arm]["mean"]
        return f"{_f(e[f'{m}_mean'], d)} ± {_f(e[f'{m}_std'], d)}"

    rows = []
    for arm in arms:
        vs_s = _comparison(res, "scratch", arm) if arm != "scratch" else None
        vs_r = _comparison(res, REFERENCE, arm) if arm not in ("scratch", REFERENCE) else None
        rows.append([f"{arm} ({res['arms'][arm]['label']})", str(summ[arm]["cases"]), dice_cell(arm, "mean"),
                     dice_cell(arm, "mean", "hd95", 1),
                     "" if vs_s is None else f"{vs_s['diff']:+.3f}", "" if vs_s is None else _p(vs_s["p_wilcoxon"]),
                     "" if vs_s is None else _p(vs_s["p_ttest"]),
                     "" if vs_r is None else f"{vs_r['diff']:+.3f}", "" if vs_r is None else _p(vs_r["p_wilcoxon"])])
    s["main_table"] = _table(["arm", "cases", "mean Dice ± std", "mean HD95 (mm) ± std", "Δ Dice vs scratch",
                              "Wilcoxon p", "t-test p", f"Δ Dice vs {REFERENCE}", "Wilcoxon p"], rows)
    crow = []
    for text, b, a, pb, pa, where in CLAIMS:
        if a not in summ or b not in summ:
            continue
        c = _comparison(res, a, b)
        if c is None:
            continue
        crow.append([text, where, f"{pb:.2f} vs {pa:.2f} ({pb - pa:+.2f})",
                     f"{100 * c['mean_b']:.2f} vs {100 * c['mean_a']:.2f} ({100 * c['diff']:+.2f})",
                     str(c["n"]), _p(c["p_wilcoxon"]), verdict(c["diff"], c["p_wilcoxon"])])
    s["claims"] = _table(["claim", "paper", "paper Dice %", "ours Dice % (same cases)", "n", "Wilcoxon p",
                          "verdict at this scale"], crow) if crow else "No pair of arms to compare."
    s["dice_table"] = _table(["class"] + arms, [[c] + [dice_cell(a, c) for a in arms] for c in classes]
                             + [["**mean (per case)**"] + [dice_cell(a, "mean") for a in arms]])
    s["hd95_table"] = _table(["class"] + arms, [[c] + [dice_cell(a, c, "hd95", 1) for a in arms] for c in classes]
                             + [["**mean (per case)**"] + [dice_cell(a, "mean", "hd95", 1) for a in arms]])
    comp_rows = []
    for c in res["comparisons"]:
        if c["metric"] != "dice":
            continue
        comp_rows.append([f"{c['b']} vs {c['a']}", c["class"], str(c["n"]), _f(c["mean_a"]), _f(c["mean_b"]),
                          "n/a" if c["diff"] is None else f"{c['diff']:+.3f}", _p(c["p_wilcoxon"]), _p(c["p_ttest"])])
    s["comparisons"] = ("<details><summary>every pair and class (Dice)</summary>\n\n"
                        + _table(["B vs A", "class", "n", "A", "B", "B - A", "Wilcoxon p", "t-test p"], comp_rows)
                        + "\n\n</details>")
    prow = []
    for label, key in (("paper, no pre-training (Table 2)", "HyMamba, no pre-training"),
                       ("paper, MambaMIM (Table 2)", "HyMamba, MambaMIM")):
        prow.append([label] + [f"{v:.2f}" for v in paper["table2_hymamba"]["rows"][key]])
    for k in ("mask 50 %", "mask 90 %"):
        prow.append([f"paper, {k} (Table 8)"] + [f"{v:.2f}" for v in paper["table8"]["rows"][k]])
    for arm in arms:
        vals = []
        for col in cols[:-1]:
            by_name = {_class_key(k): v for k, v in summ[arm]["classes"].items()}
            ms = [by_name[c]["dice_mean"] for c in PAPER_COLUMNS[col] if c in by_name]
            ms = [m for m in ms if m is not None and math.isfinite(m)]
            vals.append(f"{100 * sum(ms) / len(ms):.2f}" if ms else "n/a")
        vals.append(_f(100 * summ[arm]["mean"]["dice_mean"], 2) if summ[arm]["mean"]["dice_mean"] is not None else "n/a")
        prow.append([f"**ours, {arm}**"] + vals)
    s["paper_vs_ours"] = _table(["Dice %"] + cols, prow)
    tp = res.get("training", {}).get("pretrain", {})
    s["pretraining"] = _table(["arm", "steps", "loss, first 10 %", "loss, last 10 %", "s/step (last window)",
                               "wall s"],
                              [[a, str(v["steps"]), _f(v["loss_first"], 4), _f(v["loss_last"], 4),
                                _f(v.get("sec_per_step"), 3), _f(v.get("seconds"), 0)] for a, v in tp.items()]) \
        if tp else "No pre-training run."
    tf = res.get("training", {}).get("finetune", {})
    frows = []
    for a, folds in tf.items():
        if not folds:
            continue
        last = [f["loss_last"] for f in folds.values() if f.get("loss_last") is not None]
        vals = [f["val"][-1][1] for f in folds.values() if f.get("val")]
        secs = [f["seconds"] for f in folds.values() if f.get("seconds")]
        frows.append([a, str(len(folds)), _f(sum(last) / len(last), 4) if last else "n/a",
                      _f(sum(vals) / len(vals), 3) if vals else "n/a", _f(sum(secs) / len(secs), 0) if secs else "n/a"])
    s["finetuning"] = _table(["arm", "folds", "final training loss (mean of folds)",
                              "last validation Dice (mean of folds)", "wall s per fold"], frows) if frows else "-"
    tm = res.get("timings", {})
    trow = []
    if data.get("seconds"):
        trow.append(["data (synth + prepare)", _f(data["seconds"].get("total"), 0)])
    for i, c in enumerate(tm.get("train_calls", [])):
        trow.append([f"train call {i + 1} ({', '.join(c.get('arms', []))})",
                     f"{_f(c.get('seconds'), 0)} ({c.get('done')}/{c.get('jobs')} jobs done"
                     f"{', stopped at the deadline' if c.get('stopped') else ''})"])
    js = tm.get("jobs", {})
    for kind in ("pretrain", "finetune", "evaluate", "reconstruct"):
        v = [t for j, t in js.items() if j.startswith(kind + ":")]
        if v:
            trow.append([f"{kind} jobs ({len(v)})", f"{sum(v) / len(v):.0f} per job, {max(v):.0f} max (concurrent)"])
    s["timings"] = _table(["stage", "wall seconds"], trow) if trow else "-"
    s["figure"] = f"![Dice per class per arm]({fig_rel})" if fig_rel else "(figure not made: matplotlib missing)"
    recs = sorted(p for p in (res.get("reconstructions") or []))
    s["reconstructions"] = "\n\n".join(f"![{Path(p).stem}]({p})" for p in recs) if recs else \
        "(no reconstruction PNG collected)"
    return s


def plot_dice(res: dict, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in res["arms"] if a in res["summary"]]
    classes = res["classes"] + ["mean"]
    fig, ax = plt.subplots(figsize=(max(9.0, 0.15 * len(classes) * len(arms) + 2), 5.0))
    width = 0.84 / max(1, len(arms))
    for i, arm in enumerate(arms):
        summ = res["summary"][arm]
        es = [summ["classes"][c] if c != "mean" else summ["mean"] for c in classes]
        means = [e["dice_mean"] if e["dice_mean"] is not None else 0.0 for e in es]
        stds = [e["dice_std"] if e["dice_std"] is not None else 0.0 for e in es]
        xs = [k + (i - (len(arms) - 1) / 2) * width for k in range(len(classes))]
        ax.bar(xs, means, width, yerr=stds, capsize=1.5, label=f"{arm} ({res['arms'][arm]['label']})",
               error_kw={"elinewidth": 0.7})
    ax.set_xticks(range(len(classes)))
    ax.set_xticklabels(classes, rotation=35, ha="right")
    ax.set_ylim(0, 1.18)  # room for the legend above the bars
    ax.set_xlabel("organ (mean: per-case mean over organs)")
    ax.set_ylabel("Dice (mean ± std over held-out cases)")
    n = max(res["summary"][a]["cases"] for a in arms)
    ax.set_title(f"MambaMIM replication ({res['scale']['name']} scale): Dice per organ and arm, "
                 f"{n} cases in {res['scale']['folds']}-fold CV")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(3, len(arms)), loc="upper center")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out_png


def stage_report(results_dir: Path | None, doc: Path, lay: Layout | None = None) -> Path:
    """Figure + the whole docs/REPLICATION.md from the template and results.json (None: the skeleton)."""
    paper = read_json(PAPER)
    res = read_json(results_dir / "results.json") if results_dir is not None else None
    if results_dir is not None and res is None:
        raise SystemExit(f"report: no results.json in {results_dir} (run collect first)")
    fig_rel = None
    results_rel = os.path.relpath(results_dir, doc.parent) if results_dir is not None else ""
    if res is not None:
        try:
            png = plot_dice(res, results_dir / "dice_per_class.png")
            fig_rel = os.path.relpath(png, doc.parent)
            log(f"report: figure {png}")
        except ImportError:
            log("report: matplotlib missing: no figure (run `report` on a machine with matplotlib)")
        # reconstruction PNGs travel with the results
        recs = []
        for p in sorted(results_dir.glob("reconstruction_*.png")):
            recs.append(os.path.relpath(p, doc.parent))
        res["reconstructions"] = recs
    sections = render_sections(res, paper, fig_rel, results_rel)
    text = TEMPLATE.read_text()
    for key, value in sections.items():
        text = text.replace("{{" + key + "}}", value)
    left = [line for line in text.splitlines() if "{{" in line]
    if left:
        raise SystemExit(f"report: unfilled placeholders in the template: {left[:3]}")
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    log(f"report: wrote {doc}")
    return doc


# ------------------------------------------------------------------------------------------ pack


PACK_SKIP_DIRS = {"data", "checkpoints", "tensorboard", "cache", ".overwritten"}
PACK_SKIP_FILES = {"encoder.pt", "last.pt", "best.pt"}


def stage_pack(lay: Layout, out: Path) -> Path:
    """A tar.gz of everything but data, checkpoints and weights: per-case CSVs, configs, splits,
    metrics, logs, job states, timings, PNGs (a few MB). Unpack it into the same root elsewhere and
    `collect` / `report` work there."""
    out.parent.mkdir(parents=True, exist_ok=True)

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        if any(p in PACK_SKIP_DIRS or p.startswith(".overwritten") for p in parts):
            return None
        if Path(info.name).name in PACK_SKIP_FILES or info.name.endswith(".npy"):
            return None
        return info

    with tarfile.open(out, "w:gz") as tar:
        for name in ("state", "logs", "eval", "pretrain", "finetune", "figures", "settings.json", "timings.json",
                     "environment.json"):
            p = lay.root / name
            if p.exists():
                tar.add(p, arcname=name, filter=keep)
        dj = lay.data / "data.json"
        if dj.is_file():
            tar.add(dj, arcname="data/data.json")
    log(f"pack: {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return out


def stage_unpack(lay: Layout, packs: list[Path]) -> None:
    """Merge packs into the root (JSON lists of environment / timings are concatenated)."""
    lay.root.mkdir(parents=True, exist_ok=True)
    envs, calls = read_json(lay.root / "environment.json", []) or [], \
        (read_json(lay.root / "timings.json", {}) or {}).get("train_calls", [])
    settings = read_calls(lay.root)
    for pack in packs:
        with tarfile.open(pack) as tar:
            members = [m for m in tar.getmembers() if not (m.name.startswith("/") or ".." in Path(m.name).parts)]
            for m in members:
                if m.name in ("environment.json", "timings.json", "settings.json"):
                    data = json.load(tar.extractfile(m))  # type: ignore[arg-type]
                    if m.name == "environment.json":
                        envs += [e for e in data if e not in envs]
                    elif m.name == "settings.json":
                        settings += [e for e in ([data] if isinstance(data, dict) else data) if e not in settings]
                    else:
                        calls += [c for c in data.get("train_calls", []) if c not in calls]
                    continue
                tar.extract(m, lay.root)
        log(f"unpack: {pack} -> {lay.root}")
    write_json(lay.root / "environment.json", envs)
    write_json(lay.root / "timings.json", {"train_calls": calls})
    write_json(lay.root / "settings.json", settings)


# ------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("data", "train", "collect", "report", "status", "pack", "unpack", "all"))
    ap.add_argument("--scale", choices=sorted(SCALES), default="micro", help="size preset (default micro)")
    ap.add_argument("--root", type=Path, default=None,
                    help="work folder (default benchmarks/replication/runs/<scale>; git-ignored)")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=None, help="arms (default: all, or --part's)")
    ap.add_argument("--part", choices=sorted(PARTS), default=None,
                    help="a self-contained half of the arms for one GPU call: " +
                         "; ".join(f"{k}: {' '.join(v)}" for k, v in PARTS.items()))
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    ap.add_argument("--jobs", type=int, default=None, help="concurrent jobs (default: the scale's)")
    ap.add_argument("--workers", type=int, default=None, help="loader workers per training job (default: the scale's)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds from now after which running jobs are stopped with a checkpoint (train / all)")
    ap.add_argument("--min-start", type=float, default=None,
                    help="start no training job with less than this many seconds to the deadline (default 40)")
    ap.add_argument("--progress-every", type=float, default=30.0, help="seconds between progress summaries")
    ap.add_argument("--results", type=Path, default=None,
                    help="collect's output / report's input (default benchmarks/replication/results/<scale>)")
    ap.add_argument("--doc", type=Path, default=None,
                    help="report's markdown (default docs/REPLICATION.md for the gpu scale, ROOT/REPLICATION.md else)")
    ap.add_argument("--skeleton", action="store_true", help="report: write the document without results")
    ap.add_argument("--pack", type=Path, nargs="+", default=None, help="pack: the tar.gz to write; unpack: those to read")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override preset values, e.g. --set pretrain_steps=500 finetune_iterations=300")
    args = ap.parse_args(argv)

    t_start = time.time()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # the runner stops its jobs with a checkpoint

    signal.signal(signal.SIGTERM, on_term)
    scale = SCALES[args.scale]
    for kv in args.set:
        key, _, value = kv.partition("=")
        if key not in Scale.__dataclass_fields__:
            ap.error(f"--set: unknown key {key!r}")
        cur = getattr(scale, key)
        if isinstance(cur, tuple):
            ap.error(f"--set: {key} is a range; edit the preset instead")
        conv: Any = type(cur) if cur is not None and not isinstance(cur, tuple) else (lambda v: None if v == "none" else int(v))
        if isinstance(cur, bool):
            conv = lambda v: v.lower() in ("1", "true", "yes")  # noqa: E731
        scale = replace(scale, **{key: conv(value)})
    root = (args.root or HERE / "runs" / scale.name).resolve()
    lay = Layout(root)
    arms = args.arms or (list(PARTS[args.part]) if args.part else list(scale.default_arms))
    jobs = args.jobs or scale.jobs
    workers = scale.workers if args.workers is None else args.workers
    results_dir = (args.results or HERE / "results" / scale.name).resolve()
    doc = args.doc or (DOC if scale.name == "gpu" else root / "REPLICATION.md")
    deadline = None if args.deadline is None else t_start + args.deadline
    min_start = 40.0 if args.min_start is None else args.min_start
    try:
        return _run_stages(args, ap, scale, lay, arms, jobs, workers, results_dir, doc, deadline, min_start, t_start)
    except KeyboardInterrupt:
        log("interrupted (the jobs were stopped with a checkpoint; run the same command again to resume)")
        return 130


def _run_stages(args: argparse.Namespace, ap: argparse.ArgumentParser, scale: Scale, lay: Layout, arms: list[str],
                jobs: int, workers: int, results_dir: Path, doc: Path, deadline: float | None, min_start: float,
                t_start: float) -> int:
    stage_times: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t = time.time()
        out = fn()
        stage_times[name] = round(time.time() - t, 1)
        log(f"stage {name}: {stage_times[name]:.1f} s")
        return out

    rc = 0
    if args.stage in ("data", "all"):
        timed("data", lambda: stage_data(scale, lay, args.device))
    if args.stage in ("train", "all"):
        if not (lay.pool_cache / "dataset.json").is_file():
            raise SystemExit(f"train: no data in {lay.data}: run the data stage first")
        result = timed("train", lambda: stage_train(scale, lay, arms, args.device, jobs, workers, deadline,
                                                    min_start, args.progress_every))
        rc = 0 if not result["remaining"] else 3
    if args.stage == "status":
        rc = 0 if stage_status(scale, lay, arms) else 3
    if args.stage in ("collect", "all"):
        if not (lay.root / "eval").is_dir():
            log("collect: nothing evaluated yet")
        else:
            # collect every arm evaluated so far (a part's call sees its own arms; the CPU machine all)
            timed("collect", lambda: stage_collect(scale, lay, arms if args.arms else
                                                   [a for a in ARMS if (lay.root / "eval" / a).is_dir()],
                                                   results_dir))
            for png in sorted((lay.root / "figures").glob("reconstruction_*.png")):
                shutil.copy2(png, results_dir / png.name)
    if args.stage == "report":
        timed("report", lambda: stage_report(None if args.skeleton else results_dir, doc))
    if args.stage == "all" and (results_dir / "results.json").is_file():
        try:
            import matplotlib  # noqa: F401

            timed("report", lambda: stage_report(results_dir, doc))
        except ImportError:
            log("report skipped (no matplotlib): run `replicate.py --scale ... report` where matplotlib is")
    if args.stage == "pack":
        if not args.pack:
            ap.error("pack needs --pack FILE.tar.gz")
        stage_pack(lay, args.pack[0])
    if args.stage == "unpack":
        if not args.pack:
            ap.error("unpack needs --pack FILE.tar.gz [...]")
        stage_unpack(lay, args.pack)
    log(f"done in {time.time() - t_start:.1f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in stage_times.items()))
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""The replication harness (benchmarks/replication/replicate.py): its pure logic (fast) and the whole
micro-scale pipeline on CPU (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "replication" / "replicate.py"
PAPER_MD = REPO.parent / "shared" / "paper" / "MambaMIM-paper.md"


@pytest.fixture(scope="module")
def rep():
    spec = importlib.util.spec_from_file_location("replicate", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["replicate"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_verdict_words(rep):
    assert rep.verdict(0.02, 0.01) == "reproduced (p < 0.05)"
    assert rep.verdict(0.02, 0.2) == "same direction, not significant"
    assert rep.verdict(-0.02, 0.01).startswith("contradicted")
    assert rep.verdict(-0.02, 0.5).startswith("not reproduced")
    assert rep.verdict(0.02, None) == "same direction, not significant"
    assert rep.verdict(None, 0.01) == "not measured"


def test_needed_jobs_skips_work_whose_results_exist(rep, tmp_path):
    flags = {"pretrain:a": False, "finetune:a:0": False, "evaluate:a:0": True,
             "finetune:a:1": False, "evaluate:a:1": False}

    def job(name, deps):
        return rep.Job(name, name.split(":")[0], "a", None, deps, 0, tmp_path, lambda n=name: flags[n], lambda r: [])

    jobs = [job("pretrain:a", []), job("finetune:a:0", ["pretrain:a"]), job("evaluate:a:0", ["finetune:a:0"]),
            job("finetune:a:1", ["pretrain:a"]), job("evaluate:a:1", ["finetune:a:1"])]
    todo, done = rep.needed_jobs(jobs)
    # fold 0 is evaluated: its fine-tuning is not needed; fold 1 still needs the pre-training
    assert [j.name for j in todo] == ["pretrain:a", "finetune:a:1", "evaluate:a:1"]
    assert done == {"finetune:a:0", "evaluate:a:0"}
    flags["evaluate:a:1"] = True
    todo, done = rep.needed_jobs(jobs)
    assert todo == [] and "pretrain:a" in done


def test_parts_cover_every_arm_once(rep):
    parts = [a for name in ("1", "2") for a in rep.PARTS[name]]
    assert sorted(rep.PARTS["all"]) == sorted(rep.ARMS)
    assert sorted(parts) == sorted(rep.ARMS) and len(parts) == len(set(parts))
    # part 3: every arm but the two that part 1 must run first (scratch, the reference)
    assert sorted(rep.PARTS["3"]) == sorted(set(rep.ARMS) - {"scratch", rep.REFERENCE})
    assert rep.REFERENCE in rep.PARTS["1"] and "scratch" in rep.PARTS["1"]


def test_gpu_scale_is_label_scarce_and_large_enough(rep):
    g = rep.SCALES["gpu"]
    assert g.num_unlabelled + 1 >= 200 and g.folds == 5
    assert g.num_labelled - g.num_labelled // g.folds <= 20
    assert g.crop % 16 == 0 and g.pretrain_batch % g.pretrain_crops == 0


def _fake_results(rep):
    classes = ["spleen", "liver"]

    def entry(d):
        e = {c: {"dice_mean": d, "dice_std": 0.1, "dice_n": 4, "hd95_mean": 10.0, "hd95_std": 1.0, "hd95_n": 4}
             for c in classes}
        return {"classes": e, "mean": {"dice_mean": d, "dice_std": 0.1, "dice_n": 4, "hd95_mean": 10.0,
                                       "hd95_std": 1.0, "hd95_n": 4}, "folds": [0, 1], "cases": 4}

    scale = rep.asdict(rep.SCALES["micro"])
    return {
        "generated": "2026-01-01T00:00:00", "scale": scale, "classes": classes, "reference": "toki75",
        "arms": {a: {**rep.asdict(rep.ARMS[a]), "evaluated_folds": [0, 1], "cases": 4} for a in ("scratch", "toki75")},
        "summary": {"scratch": entry(0.70), "toki75": entry(0.75)},
        "comparisons": [{"a": "scratch", "b": "toki75", "class": "mean", "metric": "dice", "n": 4, "mean_a": 0.70,
                         "mean_b": 0.75, "diff": 0.05, "p_ttest": 0.01, "p_wilcoxon": 0.03}],
        "data": {"pool_volumes": 7, "real_ct_in_pool": True, "seconds": {"total": 3.0}},
        "training": {"pretrain": {}, "finetune": {}}, "timings": {}, "environment": [{"card": "cpu", "date": "2026-01-01"}],
    }


def test_report_from_results_and_skeleton(rep, tmp_path):
    res = _fake_results(rep)
    (tmp_path / "results.json").write_text(json.dumps(res))
    doc = rep.stage_report(tmp_path, tmp_path / "docs" / "REPLICATION.md")
    text = doc.read_text()
    assert "{{" not in text
    # the claim line carries our numbers in %, the paper's, and the verdict from the Wilcoxon p-value
    line = next(x for x in text.splitlines() if x.startswith("| pre-training helps"))
    assert "80.16 vs 77.56 (+2.60)" in line and "75.00 vs 70.00 (+5.00)" in line and "reproduced (p < 0.05)" in line
    assert "0.750 ± 0.100" in text
    skeleton = rep.stage_report(None, tmp_path / "skeleton.md").read_text()
    assert "Not run yet" in skeleton and "{{" not in skeleton and "| mask 90 % |" in skeleton


def test_paper_numbers_are_quoted_exactly(rep):
    if not PAPER_MD.is_file():
        pytest.skip("the paper (../shared/paper) is not present")
    text = PAPER_MD.read_text()
    paper = json.loads(rep.PAPER.read_text())
    rows = list(paper["table8"]["rows"].values()) + list(paper["table2_hymamba"]["rows"].values())
    for row in rows:
        pattern = r"\s+".join(r"(?:<[bu]>)?" + re.escape(f"{v:.2f}") + r"(?:</[bu]>)?" for v in row)
        assert re.search(pattern, text), row
    for name, row in paper["table9"]["rows"].items():
        assert re.search(re.escape(name) + r".*" + re.escape(f"{row[-1]:.2f}"), text), name
    assert math.isclose(paper["table8"]["rows"]["mask 75 %"][-1], 80.16)


@pytest.mark.slow
def test_micro_pipeline_end_to_end(tmp_path):
    """Every stage at toy size on CPU (about 2 minutes on 2 cores): two arms, two folds."""
    root = tmp_path / "root"
    opts = ["--scale", "micro", "--device", "cpu", "--root", str(root), "--results", str(tmp_path / "results"),
            "--arms", "scratch", "toki75", "--set", "reconstruct=false"]
    out = subprocess.run([sys.executable, str(SCRIPT), "all", *opts], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((tmp_path / "results" / "results.json").read_text())
    assert set(res["summary"]) == {"scratch", "toki75"}
    assert res["summary"]["toki75"]["cases"] == 4 and res["arms"]["toki75"]["evaluated_folds"] == [0, 1]
    cases = {c for fold in res["splits"].values() for c in fold["validation"]}
    assert len(cases) == 4  # every labelled case is held out exactly once
    assert any(c["a"] == "scratch" and c["b"] == "toki75" and c["class"] == "mean" for c in res["comparisons"])
    assert (root / "REPLICATION.md").is_file()
    # a second run finds everything done and starts nothing
    again = subprocess.run([sys.executable, str(SCRIPT), "train", *opts], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "0 job(s) to run" in again.stdout, again.stdout[-2000:]

import csv

import numpy as np

from trainer.experiment import StudyConfig, run_fraction_study, verdict


def test_fraction_study_end_to_end_and_resume(tiny_store, tmp_path):
    cfg = StudyConfig(fractions=(0.5, 1.0), seeds=(0, 1),
                      train={"backbone": "resnet18", "img_size": 32, "epochs": 1, "batch_size": 4})
    logged = []
    summary = run_fraction_study(None, tmp_path, cfg, store=tiny_store, device="cpu", log=logged.append)
    with open(tmp_path / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 2 * 2 * 3  # fractions x seeds x methods
    assert {r["method"] for r in runs} == {"slca", "backbone", "linear_probe"}
    # only the training subset shrinks: 9 train rows, stratified -> 6 at half (2 per class), 9 at full
    assert {r["fraction"]: r["train_samples"] for r in runs} == {"0.5": "6", "1.0": "9"}
    assert len(summary) == 3 * 2 and all(e["seeds"] == 2 for e in summary)
    table = (tmp_path / "summary.md").read_text()
    assert "| slca | 0.5 | 2 |" in table and "±" in table and "SLCA vs backbone alone" in table
    assert (tmp_path / "fraction_balanced_accuracy.png").stat().st_size > 1000
    again = run_fraction_study(None, tmp_path, cfg, store=tiny_store, device="cpu", log=logged.append)
    assert len(again) == len(summary) and sum("seed" in line for line in logged) == 12  # nothing rerun


def test_verdict_respects_the_seed_spread():
    base = {"fraction": 0.1, "seeds": 3}
    s = [dict(base, method="slca", balanced_accuracy_mean=0.70, balanced_accuracy_std=0.05),
         dict(base, method="backbone", balanced_accuracy_mean=0.67, balanced_accuracy_std=0.02)]
    assert verdict(s, 0.1, "balanced_accuracy").startswith("no difference")
    s[0]["balanced_accuracy_mean"] = 0.80
    assert verdict(s, 0.1, "balanced_accuracy").startswith("SLCA better by 0.130")
    s[0]["balanced_accuracy_mean"] = np.nan
    assert verdict(s, 0.1, "balanced_accuracy") == "n/a"

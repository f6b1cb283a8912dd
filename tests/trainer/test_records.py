"""The run ledger that sweeps, studies and bench's drivers resume from."""

from trainer.records import RunLedger, read_rows


def test_a_ledger_read_back_knows_its_runs_by_their_typed_keys(tmp_path):
    path = tmp_path / "runs.csv"
    ledger = RunLedger(path, {"method": str, "fraction": float, "seed": int})
    assert len(ledger) == 0 and not ledger.done("backbone", 0.2, 0)
    ledger.record({"method": "backbone", "fraction": 0.2, "seed": 0, "balanced_accuracy": 0.61})
    ledger.record({"method": "slca", "fraction": 1.0, "seed": 3, "balanced_accuracy": 0.7})
    assert [r["method"] for r in read_rows(path)] == ["backbone", "slca"]  # written after each run

    again = RunLedger(path, {"method": str, "fraction": float, "seed": int})  # a resumed driver: strings from the CSV
    assert again.done("backbone", 0.2, 0) and again.done("slca", 1, "3")  # 1 == "1.0", "3" == 3 once typed
    assert not again.done("backbone", 0.2, 1) and not again.done("backbone", 1.0, 0)
    again.record({"method": "backbone", "fraction": 0.2, "seed": 1, "balanced_accuracy": 0.6})
    assert len(read_rows(path)) == 3 and again.done("backbone", 0.2, 1)

"""A results.json is trusted as bdexp computed it only when its digest matches and its records are
consistent (bdexp/results.py): the skip on re-run, the report and bdexp.load all read it so."""
from __future__ import annotations

import json

import pytest

from bdexp.results import EDITED, inconsistencies, read_status, record, results_digest, write_results


def _records(**values):
    return [record(metric, value) for metric, value in values.items()]


def test_a_written_file_carries_its_digest_and_reads_complete(tmp_path):
    path = write_results(tmp_path, {"config_hash": "h", "x": float("nan"), "when": tmp_path}, _records(ba=0.9, asr=1.0))
    payload = json.loads(path.read_text())
    assert payload["digest"] == results_digest(payload) and read_status(path)[0] == "complete"


@pytest.mark.parametrize("edit", [
    lambda p: p["metrics"][0].update(value=0.95),  # a number changed
    lambda p: p["metrics"].pop(),  # a record dropped
    lambda p: p["run"].update(config_hash="other"),  # the run's identity changed
    lambda p: p.update(status="complete", extra=1),  # a key added
])
def test_any_edit_after_writing_is_told_apart(tmp_path, edit):
    path = write_results(tmp_path, {"config_hash": "h"}, _records(ba=0.9, asr=1.0), status="complete")
    payload = json.loads(path.read_text())
    edit(payload)
    path.write_text(json.dumps(payload))
    assert read_status(path)[0] == EDITED


@pytest.mark.parametrize("metrics, why", [
    (_records(ba=0.9, asr=0.5, tmr=0.6), "tmr 0.6 > asr 0.5"),
    (_records(ba=1.2), "ba = 1.2"),
    (_records(auroc=-0.1), "auroc = -0.1"),
    ([record("f1", 0.9, level="s1"), record("precision", 0.5, level="s1"), record("recall", 0.5, level="s1")],
     "harmonic mean"),
    ([record("a", 0.5, defense="nd"), record("asr", 0.4, defense="nd")], "a (TMR) 0.5 > asr 0.4"),
    (_records(n_poison=-3), "n_poison = -3"),
])
def test_numbers_no_computation_gives_are_found_without_a_digest(tmp_path, metrics, why):
    """A file without a digest (written by hand, or by an older bdexp) is checked for consistency."""
    assert any(why in p for p in inconsistencies(metrics)), inconsistencies(metrics)
    (tmp_path / "results.json").write_text(json.dumps({"status": "complete", "run": {}, "metrics": metrics}))
    assert read_status(tmp_path / "results.json")[0] == EDITED


def test_consistent_records_pass():
    ok = [record("ba", 0.9), record("asr", 0.99), record("tmr", 0.9),
          record("f1", 2 * 0.8 * 0.5 / 1.3, level="s1"), record("precision", 0.8, level="s1"),
          record("recall", 0.5, level="s1"), record("f1", 0.0, level="s2"), record("precision", 0.0, level="s2"),
          record("recall", 0.0, level="s2"), record("asr", 0.2, defense="nd"), record("a", 0.2, defense="nd")]
    assert inconsistencies(ok) == []


def test_partial_records_edited_by_hand_are_computed_again(tmp_path, caplog):
    """The records a run keeps for its re-run (results.PartialRecords) carry a digest too."""
    from bdexp.results import PartialRecords

    store = PartialRecords(tmp_path / "p.json", "hash", tmp_path)
    store.bind("model")
    store.put("defense:ac", [record("f1", 0.4, defense="ac")])
    assert PartialRecords(tmp_path / "p.json", "hash", tmp_path).bind("model") == 1
    payload = json.loads((tmp_path / "p.json").read_text())
    payload["steps"]["defense:ac"][0]["value"] = 0.99
    (tmp_path / "p.json").write_text(json.dumps(payload))
    again = PartialRecords(tmp_path / "p.json", "hash", tmp_path)
    assert again.bind("model") == 0 and again.get("defense:ac") is None
    assert "do not match the digest" in caplog.text

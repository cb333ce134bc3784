"""bdexp-report --table all / matrix / provenance on hand-written results.json files (known answers)."""
from __future__ import annotations


import pandas as pd
import pytest
from omegaconf import OmegaConf

from bdexp.report.cli import report
from bdexp.report.collect import collect
from bdexp.report.matrix import matrix_table
from bdexp.results import run_identity, write_results


def _record(config: dict, **extra) -> dict:
    """A run object as the pipeline writes it: results.run_identity of the composed config."""
    cfg = {"dataset": {"name": "digits"}, "model": {"name": "convnet"}, "seed": 0, **config}
    return {**run_identity(OmegaConf.create(cfg)), "config": cfg, **extra}


def _run(tmp, name, *, attack="patched", train="standard", seed=0, ba=0.9, asr=1.0, extra=(), lam=None):
    train_node = {"name": train, **({"mmd_weight": lam} if lam is not None else {})}
    run = _record({"seed": seed, "attack": {"name": attack}, "train": train_node})
    metrics = [{"metric": "ba", "value": ba}, {"metric": "asr", "value": asr}, *extra]
    write_results(tmp / "sweep" / name, run, metrics)


def _detectors(ac, cd, ispl_a):
    return [
        {"metric": "auroc", "value": ac, "defense": "ac", "level": "s3", "N": 100, "r": 0.1},
        {"metric": "auroc", "value": ac + 0.1, "defense": "ac", "level": "s3", "N": 100, "r": 1.0},
        {"metric": "auroc", "value": 0.0, "defense": "ac", "level": "s1", "N": 100, "r": 1.0},  # not s3: ignored
        {"metric": "auroc", "value": cd, "defense": "cd", "pool": "test"},
        {"metric": "auroc", "value": 0.0, "defense": "cd", "pool": "train"},  # not the test pool: ignored
        {"metric": "a", "value": ispl_a, "defense": "ispl"},
        {"metric": "c", "value": 0.8, "defense": "ispl"},
    ]


def test_matrix_cells_are_the_documented_selections(tmp_path):
    _run(tmp_path, "0", extra=_detectors(0.6, 0.9, 0.02))
    _run(tmp_path, "1", train="mlmmdr", asr=0.95, extra=_detectors(0.5, 0.7, 0.5))
    table = matrix_table(collect(tmp_path / "sweep"))
    assert list(table.columns) == ["BA", "ASR", "ac s3", "cd", "ispl TMR"]
    assert table.loc[("patched", "standard"), "ac s3"] == pytest.approx(0.65)  # mean over the s3 pools
    assert table.loc[("patched", "ML"), "cd"] == pytest.approx(0.7)
    assert table.loc[("patched", "ML"), "ispl TMR"] == pytest.approx(0.5)
    assert table.loc[("patched", "ML"), "ASR"] == pytest.approx(0.95)


def test_all_tables_report_md_seed_spread_and_failed_jobs(tmp_path):
    _run(tmp_path, "0", seed=0, extra=_detectors(0.6, 0.9, 0.0))
    _run(tmp_path, "1", seed=1, extra=_detectors(0.8, 0.7, 0.0))
    write_results(tmp_path / "sweep" / "2", {"attack": "sig", "seed": 2, "error": {"type": "ValueError"}}, [],
                  status="failed")
    written = report(tmp_path / "sweep", tmp_path / "out", "all")
    text = written["report"].read_text()
    assert "[matrix](#matrix)" in text and "[runs](#runs)" in text
    assert "(matrix.csv)" in text
    # two seeds: 0.6/0.7 and 0.8/0.9 s3 pools -> means 0.65 and 0.85 -> mean 0.75, std 0.1414
    assert "0.7500 ± 0.1414" in (tmp_path / "out" / "matrix.md").read_text()
    csv = pd.read_csv(tmp_path / "out" / "matrix.csv", index_col=[0, 1])
    assert csv.loc[("patched", "standard"), "ac s3"] == pytest.approx(0.75)
    assert "1 failed job(s)" in text and str(tmp_path / "sweep" / "2") in text
    assert "seeds [0, 1] (mean ± std over seeds)" in text


def test_only_failed_runs_give_a_clear_error(tmp_path):
    from bdexp.errors import BdexpError

    write_results(tmp_path / "s" / "0", {"attack": "sig", "error": {"type": "ValueError"}}, [], status="failed")
    with pytest.raises(BdexpError, match="1 failed run"):
        report(tmp_path / "s", None, "runs")


def test_all_survives_a_sweep_with_one_lambda(tmp_path):
    """A matrix-like sweep (one λ) once broke the mmdr_lambda plot and with it --table all."""
    _run(tmp_path, "0", extra=_detectors(0.6, 0.9, 0.0))
    _run(tmp_path, "1", train="mlmmdr", lam=0.3, extra=_detectors(0.5, 0.7, 0.5))
    written = report(tmp_path / "sweep", tmp_path / "out", "all")
    assert "mmdr_lambda:png" in written and written["mmdr_lambda:png"].exists()
    assert "[matrix](#matrix)" in written["report"].read_text()


# ---- cases: every swept key separates rows; not-learnt attacks credit no defense ----------------
def _ispl_run(tmp, name, *, ispl_a, nd_a=0.9, seed=0, attack="watermark", mode="one_to_one", scenario=0,
              eps=0.1, plain=None, device="cpu", **attack_keys):
    """A results.json as the pipeline writes it for an ISPL preset run (identity, config, records)."""
    source, target = {0: (0, 2), 1: (1, 3)}[scenario]
    config = {"seed": seed, "device": device, "progress": False,
              "dataset": {"name": "cifar10"}, "model": {"name": "preact18"}, "train": {"name": "standard"},
              "attack": {"name": attack, "mode": mode, "scenario": scenario, "poison_rate": eps, **attack_keys},
              "defense": {"nd": {"name": "nd"}, "ispl": {"name": "ispl", "alpha": 0.25}}}
    run = _record(config, source=source, target=target)
    metrics = [{"metric": "ba", "value": 0.9}, *(plain or [])]
    if nd_a is not None:
        metrics += [{"metric": m, "value": v, "defense": "nd"} for m, v in (("c", 0.9), ("a", nd_a), ("fp", 0), ("fn", 50))]
    metrics += [{"metric": m, "value": v, "defense": "ispl"} for m, v in (("c", 0.88), ("a", ispl_a), ("fp", 900), ("fn", 1))]
    write_results(tmp / "sweep" / name, run, metrics)


def test_a_watermark_sweep_reports_one_case_per_mark_and_pair(tmp_path):
    from bdexp.report.ispl import detail_table, summary_table

    for i, (mark, a) in enumerate([("peace", 0.0), ("letter_a", 0.0), ("bullet_holes", 0.5), ("colour_patch", 0.5)]):
        _ispl_run(tmp_path, str(i), ispl_a=a, mark=mark)
    # a second seed of `peace` on another device: the same case (seed and device never split)
    _ispl_run(tmp_path, "4", ispl_a=0.004, mark="peace", seed=1, device="cuda")
    frame = collect(tmp_path / "sweep")
    summary = summary_table(frame)
    assert summary.loc[0.1, ("cifar10", "watermark", "one_to_one")] == "2 / 4"  # was "0 / 1" (medians merged)
    detail = detail_table(frame)
    assert "attack.mark" in detail.index.names and len(detail) == 4
    assert detail.xs("peace", level="attack.mark")[("ispl", "a")].item() == pytest.approx(0.002)  # median of 2 seeds
    assert detail.xs("bullet_holes", level="attack.mark")[("ispl", "a")].item() == pytest.approx(0.5)


def test_two_clbd_pgd_settings_give_two_rows(tmp_path):
    from bdexp.report.ispl import detail_table

    _ispl_run(tmp_path, "0", ispl_a=0.0, attack="clbd", pgd_eps=0.0314, pgd_norm="linf")
    _ispl_run(tmp_path, "1", ispl_a=0.3, attack="clbd", pgd_eps=0.0627, pgd_norm="linf")
    detail = detail_table(collect(tmp_path / "sweep"))
    assert list(detail.index.names) == ["attack", "pair", "eps", "attack.pgd_eps"]
    assert detail[("ispl", "a")].tolist() == [0.0, 0.3]
    assert "attack.pgd_norm" not in detail.index.names  # the same in both runs: not a case


def test_a_defense_is_not_credited_against_an_attack_never_learnt(tmp_path):
    from bdexp.report.ispl import detail_table, summary_table

    _ispl_run(tmp_path, "0", ispl_a=0.005, nd_a=0.0, scenario=0)  # CPU-scale DLBD with crop+flip: ND TMR 0.000
    _ispl_run(tmp_path, "1", ispl_a=0.0, nd_a=0.8, scenario=1)  # learnt, and ISPL+B removed it
    frame = collect(tmp_path / "sweep")
    summary = summary_table(frame)
    assert summary.iloc[0, 0] == "1 / 1 (1 left out)"  # not "2 / 2"
    assert any("1 left out" in n and "ND's TMR < 0.01" in n for n in summary.attrs["notes"])
    detail = detail_table(frame)
    marks = detail[("undefended attack", "")]
    assert marks.loc[("watermark", "0/2", 0.1)] == "not learnt (ND TMR 0.000)"
    assert marks.loc[("watermark", "1/3", 0.1)] == ""
    assert pd.isna(detail.loc[("watermark", "0/2", 0.1), ("ispl", "a")])  # not credited
    assert detail.loc[("watermark", "0/2", 0.1), ("nd", "a")] == 0.0  # the evidence stays
    written = report(tmp_path / "sweep", tmp_path / "out", "ispl_summary")
    assert "1 left out" in written["md"].read_text()


def test_without_nd_the_runs_own_tmr_then_asr_decide(tmp_path):
    from bdexp.report.ispl import summary_table

    _ispl_run(tmp_path, "0", ispl_a=0.0, nd_a=None, scenario=0, plain=[{"metric": "asr", "value": 0.03}])
    _ispl_run(tmp_path, "1", ispl_a=0.0, nd_a=None, scenario=1,
              plain=[{"metric": "asr", "value": 0.3}, {"metric": "tmr", "value": 0.2}])  # TMR first: learnt
    # (ASR 0.3 < 0.5 would say "not learnt"; TMR <= ASR, as in every run bdexp writes)
    assert summary_table(collect(tmp_path / "sweep")).iloc[0, 0] == "1 / 1 (1 left out)"


def test_matrix_leaves_out_runs_whose_attack_was_not_learnt(tmp_path):
    _run(tmp_path, "0", seed=0, asr=0.9, extra=_detectors(0.8, 0.9, 0.0))
    _run(tmp_path, "1", seed=1, asr=0.1, extra=_detectors(0.2, 0.5, 0.4))  # ASR 0.1: not learnt
    _run(tmp_path, "2", attack="blended", asr=0.2, extra=_detectors(0.6, 0.6, 0.1))
    table = matrix_table(collect(tmp_path / "sweep"))
    assert table.loc[("patched", "standard"), "ac s3"] == pytest.approx(0.85)  # seed 0 only (0.8 / 0.9 pools)
    assert table.loc[("patched", "standard"), "ASR"] == pytest.approx(0.5)  # context keeps every run
    assert table.loc[("patched", "standard"), "undefended attack"] == "1 of 2 runs not learnt"
    assert pd.isna(table.loc[("blended", "standard"), "cd"])
    assert table.loc[("blended", "standard"), "undefended attack"] == "not learnt (ASR 0.200)"
    assert any("1 left out" in n and "ASR < 0.5" in n for n in table.attrs["notes"])


def test_f1_levels_leave_out_unlearnt_runs(tmp_path):
    from bdexp.report.mmdr import f1_table

    f1 = lambda v: [{"metric": "f1", "value": v, "defense": "ac", "level": "s3", "N": 100, "r": 1.0}]  # noqa: E731
    _run(tmp_path, "0", seed=0, asr=1.0, extra=f1(0.9))
    _run(tmp_path, "1", seed=1, asr=0.05, extra=f1(0.1))
    table = f1_table(collect(tmp_path / "sweep"))
    assert table.iloc[0][(100, 1.0, "s3")] == pytest.approx(0.9)
    assert table.iloc[0][("undefended attack", "", "")] == "1 of 2 runs not learnt"


def test_f1_levels_say_which_f1_a_row_shows(tmp_path):
    """SS's removal rule and its best-threshold F1 are separate rows, labelled; SR has only max-F1."""
    from bdexp.report.mmdr import f1_table

    tags = {"level": "s3", "N": 100, "r": 1.0}
    extra = [{"metric": "f1", "value": 0.8, "defense": "ss", "rule": "top 1.5·eps·n", **tags},
             {"metric": "f1_max", "value": 1.0, "defense": "ss", "rule": "top 1.5·eps·n", **tags},
             {"metric": "f1", "value": 0.95, "defense": "sr", "rule": "max-F1", **tags},
             {"metric": "f1_max", "value": 0.95, "defense": "sr", "rule": "max-F1", **tags}]
    _run(tmp_path, "0", extra=extra)
    table = f1_table(collect(tmp_path / "sweep"))
    cell = {key: row[(100, 1.0, "s3")] for key, row in table.iterrows()}
    by_label = {(k[table.index.names.index("defense")], k[table.index.names.index("f1")]): v for k, v in cell.items()}
    assert by_label == {("ss", "rule: top 1.5·eps·n"): 0.8, ("ss", "max-F1"): 1.0, ("sr", "max-F1"): 0.95}


def test_matrix_conflicting_threat_models_and_detectors_from_the_records(tmp_path):
    extra = _detectors(0.6, 0.9, 0.3) + [
        {"metric": "auroc", "value": 0.7, "defense": "foo", "pool": "test"},  # an input detector bdexp may add
        {"metric": "auroc", "value": 0.4, "defense": "bar", "level": "s3", "N": 100, "r": 1.0},  # a pool detector
    ]
    _run(tmp_path, "0", extra=extra)
    _run(tmp_path, "1", train="mlmmdr", lam=0.3,
         extra=extra + [{"metric": "threat_model_conflict", "value": 1.0, "defense": "ispl"}])
    table = matrix_table(collect(tmp_path / "sweep"))
    assert list(table.columns) == ["BA", "ASR", "ac s3", "bar s3", "cd", "foo", "ispl TMR"]
    assert table.loc[("patched", "ML"), "ispl TMR"] == "n/a (threat models differ)"
    assert table.loc[("patched", "standard"), "ispl TMR"] == pytest.approx(0.3)
    assert table.loc[("patched", "ML"), "foo"] == pytest.approx(0.7)
    assert any("ISPL's defender" in n for n in table.attrs["notes"])
    md = report(tmp_path / "sweep", tmp_path / "out", "matrix")["md"].read_text()
    assert "n/a (threat models differ)" in md and "0.3000" in md


def test_keys_an_attack_already_determines_add_no_rows(tmp_path):
    """A sweep over attacks varies attack.size/attack.alpha with the attack: no extra levels; a
    swept poison rate does split."""
    for i, (attack, keys) in enumerate([("patched", {"size": 3}), ("blended", {"alpha": 0.2})]):
        for j, rate in enumerate((0.05, 0.1)):
            run = _record({"attack": {"name": attack, "poison_rate": rate, **keys}, "train": {"name": "standard"}})
            write_results(tmp_path / "sweep" / f"{i}{j}", run, [{"metric": "ba", "value": 0.9}, {"metric": "asr", "value": 1.0},
                                                                 *_detectors(0.5 + 0.1 * j, 0.9, 0.0)])
    table = matrix_table(collect(tmp_path / "sweep"))
    assert list(table.index.names) == ["attack", "regime", "attack.poison_rate"]
    assert table.loc[("patched", "standard", 0.1), "ac s3"] == pytest.approx(0.65)


def test_ispl_pair_labels_name_the_mode():
    """all-to-one has no source class ("all/T"), all-to-all sends y to y+1; no "<NA>" in a row label."""
    from bdexp.report.ispl import _sanitizer_rows

    df = pd.DataFrame([
        {"metric": "a", "value": 0.0, "defense": "ispl", "attack": "dlbd", "source": 1.0, "target": 3.0,
         "attack.mode": "one_to_one"},
        {"metric": "a", "value": 0.0, "defense": "ispl", "attack": "patched", "source": None, "target": 3.0},  # default mode
        {"metric": "a", "value": 0.0, "defense": "ispl", "attack": "patched", "source": None, "target": 0.0,
         "attack.mode": "all_to_all"},
    ])
    assert _sanitizer_rows(df)["pair"].tolist() == ["1/3", "all/3", "y/y+1"]


def test_printed_tables_fit_80_columns_with_every_swept_key(tmp_path, capsys, monkeypatch):
    """The runs table names the key the sweep varied (attack.mark) and, like ISPL's wide detail
    table, prints within 80 columns with whole cells (constant keys moved above, then transposed)."""
    monkeypatch.setenv("COLUMNS", "80")
    marks = ["peace", "letter_a", "bullet_holes", "colour_patch"]
    for i, mark in enumerate(marks):
        _ispl_run(tmp_path, str(i), ispl_a=0.0, mark=mark, plain=[{"metric": "asr", "value": 0.9}])
    capsys.readouterr()
    report(tmp_path / "sweep", tmp_path / "out", "runs")
    report(tmp_path / "sweep", tmp_path / "out", "ispl_detail")
    out = capsys.readouterr().out
    boxed = [ln for ln in out.splitlines() if any(ch in ln for ch in "┃│")]
    assert boxed and max(len(ln) for ln in boxed) <= 80 and "…" not in out, out
    assert "attack.mark" in out and all(f" {m} " in out for m in marks)
    assert "same in every row: dataset cifar10, model preact18" in out
    assert "ispl_detail (transposed)" in out


# ---- columns come from the records and the registries, not from lists in the report code ---------
@pytest.fixture
def new_defenses():
    """Defenses registered for the test only, one of each kind the matrix shows, with names no
    report module has ever seen."""
    from bdexp.defenses import DEFENSES

    kinds = {"zz_pool": "pool_detector", "zz_input": "input_detector", "zz_keep": "sanitizer"}
    for name, kind in kinds.items():
        DEFENSES.register(name, kind=kind)(lambda *args, **kwargs: None)
    yield kinds
    for name in kinds:
        DEFENSES.unregister(name)


def test_newly_registered_defenses_get_matrix_and_detect_columns(tmp_path, new_defenses):
    from bdexp.report.detect import detect_table

    extra = [{"metric": "auroc", "value": 0.61, "defense": "zz_pool", "level": "s3", "N": 100, "r": 1.0},
             *({"metric": m, "value": 0.72, "defense": "zz_input", "pool": p}
               for m in ("auroc", "aupr", "tpr95") for p in ("train", "test")),
             {"metric": "a", "value": 0.03, "defense": "zz_keep"}, {"metric": "fp", "value": 10, "defense": "zz_keep"},
             # a sanitizer's records on a named pool are not an input detector's column
             {"metric": "auroc", "value": 0.5, "defense": "zz_keep", "pool": "test"}]
    _run(tmp_path, "0", extra=_detectors(0.6, 0.9, 0.2) + extra)
    frame = collect(tmp_path / "sweep")
    table = matrix_table(frame)
    assert list(table.columns) == ["BA", "ASR", "ac s3", "zz_pool s3", "cd", "zz_input", "ispl TMR", "zz_keep TMR"]
    assert table.loc[("patched", "standard"), "zz_pool s3"] == pytest.approx(0.61)
    assert table.loc[("patched", "standard"), "zz_input"] == pytest.approx(0.72)
    assert table.loc[("patched", "standard"), "zz_keep TMR"] == pytest.approx(0.03)
    detect = detect_table(frame)
    assert list(detect.columns) == ["cd", "zz_input"]  # OVL's detectors first, then every other one
    assert detect.loc[("test", "tpr95"), "zz_input"] == pytest.approx(0.72)


def test_identity_holds_the_options_that_differ_from_the_declared_defaults():
    cfg = {"dataset": {"name": "digits"}, "model": {"name": "convnet"}, "seed": 3,
           "attack": {"name": "patched", "poison_rate": 0.1, "mode": "one_to_one", "source": 1},
           "train": {"name": "mlmmdr", "mmd_weight": 0.0, "kernel": "gmk_adaptive"}}
    ident = run_identity(OmegaConf.create(cfg))
    assert {k: v for k, v in ident.items() if "." in k} == {"attack.mode": "one_to_one", "attack.source": 1,
                                                           "train.mmd_weight": 0.0}
    assert ident["regime"] == "rbt" and ident["seed"] == 3  # λ = 0: the regime's own name (ML-MMDR §5's RBT)
    assert "seed" not in ident["case_keys"] and "train.mmd_weight" in ident["case_keys"]


def test_an_unchanged_option_reads_its_declared_default(tmp_path):
    """λ swept as {0, default}: the default run's identity lacks train.mmd_weight, the λ table
    (ML-MMDR Fig. 3) still reads 0.3 for it and RBT's row is labelled as ML-MMDR names it."""
    from bdexp.report.mmdr import lambda_table

    _run(tmp_path, "0", train="mlmmdr", lam=0.0, asr=0.9)
    _run(tmp_path, "1", train="mlmmdr", asr=0.8)
    frame = collect(tmp_path / "sweep")
    assert set(frame["regime"]) == {"RBT", "ML"}
    table = lambda_table(frame)
    assert table.loc[0.0, ("mlmmdr", "asr")] == pytest.approx(0.9)
    assert table.loc[0.3, ("mlmmdr", "asr")] == pytest.approx(0.8)


def test_an_older_record_takes_its_identity_from_its_config(tmp_path):
    run = {"dataset": "digits", "model": "convnet", "attack": "blended", "train": "standard", "seed": 0,
           "lambda": None, "config": {"seed": 0, "dataset": {"name": "digits"}, "model": {"name": "convnet"},
                                      "attack": {"name": "blended", "alpha": 0.3}, "train": {"name": "standard"}}}
    write_results(tmp_path / "old", run, [{"metric": "ba", "value": 0.9}])
    frame = collect(tmp_path / "old")
    assert frame.loc[0, "attack.alpha"] == pytest.approx(0.3) and "attack.alpha" in frame.loc[0, "case_keys"]

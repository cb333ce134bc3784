"""The sanitizer protocol: keep-mask -> retrain -> C / A / FP / FN."""
from bdexp import pipeline


def _by_defense(out, name):
    return {r["metric"]: r["value"] for r in out["metrics"] if r.get("defense") == name}


def test_oracle_removes_the_backdoor_and_nd_reuses_the_run_model(tiny_cfg, tmp_path):
    out = pipeline.run(tiny_cfg("defense=[nd,oracle]", "train.epochs=6", "attack.mode=one_to_one",
                                "attack.source=1", "attack.poison_rate=0.5", cache=True), tmp_path)
    run = {r["metric"]: r["value"] for r in out["metrics"] if "defense" not in r}
    nd, oracle = _by_defense(out, "nd"), _by_defense(out, "oracle")
    n_poison = out["run"]["n_poison"]
    assert nd["fp"] == 0 and nd["fn"] == n_poison and nd["n_removed"] == 0
    assert nd["retrain_cache"] == 1.0  # keep-all = the run's own model, not retrained
    assert nd["a"] == run["tmr"] and nd["c"] == run["ba"]
    assert oracle["fp"] == 0 and oracle["fn"] == 0 and oracle["n_removed"] == n_poison
    assert run["tmr"] > 0.5 and oracle["a"] < 0.1 and oracle["c"] > 0.9

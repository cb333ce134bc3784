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


def test_class_sanitizers_remove_poison(tiny_cfg, tmp_path):
    """SS/AC per class on a model that learned a strong trigger: most of the poison goes."""
    out = pipeline.run(tiny_cfg("defense=[ss_train,ac_train]", "train.epochs=6", "attack.poison_rate=0.1",
                                "dataset.train_size=512", cache=True), tmp_path)
    n_poison = out["run"]["n_poison"]
    ss, ac = _by_defense(out, "ss_train"), _by_defense(out, "ac_train")
    assert ss["fn"] <= 0.2 * n_poison  # SS keeps few poisoned samples
    assert ss["n_removed"] >= n_poison
    assert ac["n_removed"] == ac["fp"] + (n_poison - ac["fn"])  # removed = clean removed + poison removed
    assert ac["fn"] <= 0.5 * n_poison and ac["fp"] <= 0.05 * 512  # measured: fn 14 of 51, fp 0
    assert ss["a"] <= 0.05 and ss["a"] <= ac["a"]  # measured: SS 0.0, AC 0.33

"""Every YAML composes, and the defaults are the documented ones."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, compose_cfg

LIST_GROUPS = {"defense", "analysis"}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))  # _x: a base


ALL = [(g, o) for g in ("dataset", "model", "attack", "train", "scale", "defense", "analysis", "experiment")
       for o in _options(g)]


@pytest.mark.parametrize("group,option", ALL, ids=[f"{g}={o}" for g, o in ALL])
def test_every_yaml_composes(group, option):
    override = f"{group}=[{option}]" if group in LIST_GROUPS else f"{group}={option}"
    cfg = compose_cfg([override])
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group in ("dataset", "model", "attack"):
        # a variant file (attack/warped_strong.yaml) extends a sibling and keeps its method's name
        assert container[group]["name"] == _base(group, option)
    if group == "train":  # a schedule file names its regime (ispl_preact18 is `standard`)
        from bdexp.training import REGIMES

        assert container["train"]["name"] in REGIMES
    if group in LIST_GROUPS:
        assert option in container[group]


def _base(group: str, option: str) -> str:
    """The method a config file selects: its own stem, or the sibling file its defaults extend."""
    raw = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
    siblings = [d for d in raw.get("defaults", []) if isinstance(d, str) and not d.startswith("_") and d != "_self_"
                and (CONF_DIR / group / f"{d}.yaml").exists()]
    return siblings[0] if siblings else option


def test_defaults_are_the_documented_run():
    cfg = compose_cfg([], as_is=True)
    assert (cfg.dataset.name, cfg.model.name, cfg.attack.name, cfg.train.name) == ("digits", "convnet", "patched", "standard")
    assert cfg.attack.mode == "all_to_one" and cfg.attack.target == 0 and cfg.attack.poison_rate == 0.1
    assert cfg.seed == 0 and cfg.device == "auto" and cfg.cache.enabled


def test_every_dataset_has_root_and_limits():
    for option in _options("dataset"):
        cfg = compose_cfg([f"dataset={option}"])
        for key in ("root", "image_size", "train_limit", "test_limit", "augment"):
            assert key in cfg.dataset, f"dataset/{option}.yaml lacks {key}"


def test_scale_cpu_shrinks_but_command_line_wins():
    cfg = compose_cfg(["scale=cpu"])
    assert cfg.dataset.train_limit == 10000 and cfg.train.epochs < compose_cfg([]).train.epochs
    cfg = compose_cfg(["scale=cpu", "train.epochs=2"])
    assert cfg.train.epochs == 2


def test_misspelt_key_is_rejected():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="poison_rte"):
        compose_cfg(["attack.poison_rte=0.2"])


def test_a_built_wheel_ships_every_config(tmp_path):
    """`pip install .` (not editable) ships the top-level conf/ tree as the package bdexp.conf."""
    import subprocess
    import sys
    import zipfile

    root = CONF_DIR.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(root)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("bdexp-*.whl"))
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml")}
    expected = {"bdexp/conf/" + str(p.relative_to(CONF_DIR)) for p in CONF_DIR.rglob("*.yaml")}
    assert expected <= shipped, f"missing from the wheel: {sorted(expected - shipped)}"
    # the SLURM launcher, in Hydra's plugin namespace (conf/hydra/launcher/slurm.yaml's _target_)
    assert "hydra_plugins/bdexp_launcher/__init__.py" in zipfile.ZipFile(wheel).namelist()


ISPL_PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("ispl_*.yaml"))


@pytest.mark.parametrize("preset", ISPL_PRESETS)
def test_ispl_presets_train_without_augmentation_at_cpu_scale_only(preset):
    """ISPL's small triggers are not learnt at scale=cpu with crop + flip (conf/ispl_scale/cpu.yaml);
    at full scale the dataset's augmentation (ISPL's setting) stays, and the command line wins."""
    full = compose_cfg([f"experiment={preset}"])
    dataset = OmegaConf.load(CONF_DIR / "dataset" / f"{full.dataset.name}.yaml")
    assert full.dataset.augment == dataset.augment and full.dataset.augment.crop_padding > 0
    cpu = compose_cfg([f"experiment={preset}", "scale=cpu"])
    assert (cpu.dataset.augment.crop_padding, cpu.dataset.augment.flip) == (0, False)
    assert cpu.dataset.train_limit == 10000  # scale=cpu itself still applies
    assert compose_cfg([f"experiment={preset}", "scale=cpu", "dataset.augment.crop_padding=2"]).dataset.augment.crop_padding == 2
    assert compose_cfg(["scale=cpu"]).dataset.augment.crop_padding > 0  # only the ISPL presets


def test_ispl_gtsrb_uses_the_papers_alpha():
    # ISPL App. D.2.5: "α = 1/2 (for GTSRB, due to the imbalanced class sizes) and α = 1/4 (for CIFAR-10)"
    assert compose_cfg(["experiment=ispl_gtsrb"]).defense.ispl.alpha == 0.5
    assert compose_cfg(["experiment=ispl_cifar_dlbd"]).defense.ispl.alpha == 0.25


RGB_PRESETS = ["rgb_mlmmdr", "rgb_ispl", "rgb_iscp", "rgb_ovl", "rgb_cd"]


@pytest.mark.parametrize("preset", RGB_PRESETS)
def test_rgb_presets_are_their_own_cpu_scale(preset):
    """The rgb_* presets run on an image folder with their own epochs, recorded as scale rgb_cpu;
    scale=cpu (merged after the preset) would undo their epochs, so it is refused by name."""
    from bdexp.errors import ConfigError
    from bdexp.validation import validate_config

    cfg = compose_cfg([f"experiment={preset}", "dataset.root=/some/cifar"])
    validate_config(cfg)
    assert cfg.dataset.name == "imagefolder" and cfg.dataset.root == "/some/cifar"
    assert cfg.scale_name == "rgb_cpu" and cfg.train.epochs > 8
    assert (cfg.dataset.train_limit, cfg.dataset.test_limit) == (10000, 2000)
    with pytest.raises(ConfigError, match="scale=cpu cannot be combined"):
        validate_config(compose_cfg([f"experiment={preset}", "scale=cpu"]))


def test_rgb_detection_presets_share_one_model_setting():
    """rgb_cd, rgb_ovl and rgb_iscp train the same models (one cache entry per attack)."""
    keys = [{k: OmegaConf.to_container(compose_cfg([f"experiment={p}", "attack=patched"])[k], resolve=True)
             for k in ("dataset", "model", "train")} for p in ("rgb_cd", "rgb_ovl", "rgb_iscp")]
    assert keys[0] == keys[1] == keys[2]
    assert keys[0]["dataset"]["augment"] == {"crop_padding": 0, "flip": False}


@pytest.mark.parametrize("norm,ok", [("1", True), ("2", True), ("inf", True), ("3", False), ("abc", False)])
def test_overlap_norm_accepts_the_three_norms_ovl_evaluates(norm, ok):
    """OVL evaluates ℓ1, ℓ2 and ℓ∞; `defense.overlap.norm=inf` (a float to Hydra) was refused once."""
    from bdexp.errors import ConfigError
    from bdexp.validation import validate_config

    cfg = compose_cfg(["defense=[overlap]", f"defense.overlap.norm={norm}"])
    if ok:
        validate_config(cfg)
    else:
        with pytest.raises(ConfigError, match="defense.overlap.norm"):
            validate_config(cfg)

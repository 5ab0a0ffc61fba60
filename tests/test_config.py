"""The run config: presets load, overrides apply, every kind of bad value fails with a clear error."""

import pytest
import yaml

from mae_scale.config import Config, ConfigError, list_presets

PRESETS = ["demo", "vit_b", "vit_l", "vit_h", "vit_g", "vit_2b"]


def test_all_presets_exist():
    assert set(PRESETS) <= set(list_presets())


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_validates(name):
    cfg = Config.load(name)
    cfg.validate(world_size=8, check_paths=False)
    assert cfg.model.preset == ("tiny" if name == "demo" else name)
    if name != "demo":  # MAE-ST defaults
        assert (cfg.data.num_frames, cfg.data.stride, cfg.data.size) == (16, 4, 224)
        assert cfg.model.mask_ratio == 0.9 and cfg.model.t_patch_size == 2


def test_overrides_apply_with_types():
    cfg = Config.load(
        "demo",
        [
            "model.mask_ratio=0.75",
            "train.steps=7",
            "data.crop_scale=[0.3, 0.9]",
            "log.wandb=off",
            "data.flip=false",
            "optim.base_lr=1e-4",
            "model.mask_type=tube",
        ],
    )
    assert cfg.model.mask_ratio == 0.75 and cfg.train.steps == 7
    assert cfg.data.crop_scale == (0.3, 0.9) and cfg.data.flip is False
    assert cfg.log.wandb == "off" and cfg.optim.base_lr == 1e-4 and cfg.model.mask_type == "tube"


def test_yaml_path_and_saved_round_trip(tmp_path):
    cfg = Config.load("demo", ["train.steps=11"])
    cfg.save(tmp_path / "config.yaml")
    again = Config.load(str(tmp_path / "config.yaml"))
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["steps"] == 11


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.mask_typ=tube", "unknown config key 'model.mask_typ'; did you mean 'model.mask_type'"),
        ("modle.preset=vit_b", "did you mean 'model'"),
        ("model.preset=vit_hh", "did you mean 'vit_h'"),
        ("model.mask_type=tubes", "model.mask_type='tubes': must be one of random, tube, frame, cube"),
        ("model.mask_ratio=1.5", "model.mask_ratio=1.5: must be in [0, 1)"),
        (
            "model.decoder_mask_type=cell",
            "model.decoder_mask_type='cell': must be one of running_cell, random",
        ),
        ("model.decoder_mask_ratio=1.0", "model.decoder_mask_ratio=1.0: must be in [0, 1) (0: off)"),
        (
            "model.decoder_mask_ratio=0.6",
            "model.decoder_mask_ratio=0.6: decoder_mask_type 'running_cell' drops",
        ),
        ("train.steps=ten", "train.steps='ten': expected an integer"),
        ("train.batch_size=0", "train.batch_size=0: must be > 0"),
        ("data.crop_scale=0.5", "data.crop_scale=0.5: expected a list of 2 values"),
        ("data.size=100", "data.size=100: must be a multiple of the patch size 16"),
        ("data.num_frames=7", "data.num_frames=7: must be a multiple of model.t_patch_size=2"),
        ("log.wandb=yes", "log.wandb='yes': must be one of offline, online, off"),
        (
            "checkpoint.reshard_data=drop",
            "checkpoint.reshard_data='drop': must be one of exact, replay, skip",
        ),
        ("data.flip=maybe", "data.flip='maybe': expected true or false"),
        ("model=3", "model='3': is a section"),
        ("train.steps", "expected key.sub=value"),
        (
            "model.mask_type=frame",
            "model.mask_ratio=0.9: with model.mask_type='frame' must keep at least one of 4",
        ),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, needle):
    with pytest.raises(ConfigError) as err:
        Config.load("demo", [override]).validate(world_size=2, check_paths=False)
    assert needle in str(err.value)


def test_dual_masking_that_leaves_nothing_to_reconstruct_is_refused():
    """demo: 8x64 clips, grid (4, 4, 4) = 64 tokens, mask 0.9 keeps 6 visible: 58 masked."""
    ok = Config.load("demo", ["model.decoder_mask_ratio=0.75"]).validate(check_paths=False)  # drops 48
    assert ok.model.decoder_mask_type == "running_cell"
    Config.load("demo", ["model.decoder_mask_ratio=0.9", "model.decoder_mask_type=random"]).validate(
        check_paths=False
    )  # drops 57 of the 58 masked
    cfg = Config.load("demo", ["model.decoder_mask_ratio=0.92", "model.decoder_mask_type=random"])
    with pytest.raises(ConfigError) as err:
        cfg.validate(check_paths=False)
    msg = str(err.value)
    assert "model.decoder_mask_ratio=0.92: decoder_mask_ratio 0.92 drops 58 of 64 tokens but only 58" in msg
    assert "no masked token would be left to reconstruct; it must be below 0.9062" in msg
    assert "model.mask_type='random', model.mask_ratio=0.9, grid (4, 4, 4)" in msg


def test_model_kwargs_carry_the_dual_masking_setting():
    from mae_scale.model.mae import MaskedAutoencoderViT
    from mae_scale.train.engine import model_kwargs

    cfg = Config.load("demo", ["model.decoder_mask_ratio=0.5", "model.decoder_mask_type=random"])
    model = MaskedAutoencoderViT(**model_kwargs(cfg), device="meta")
    assert (model.decoder_mask_ratio, model.decoder_mask_type) == (0.5, "random")
    assert model_kwargs(Config.load("demo"))["decoder_mask_ratio"] == 0.0


def test_all_problems_reported_together():
    cfg = Config.load("demo", ["train.batch_size=0", "model.mask_ratio=2.0"])
    with pytest.raises(ConfigError) as err:
        cfg.validate(check_paths=False)
    assert "train.batch_size" in str(err.value) and "model.mask_ratio" in str(err.value)


def test_missing_shards_and_unknown_deepspeed_file(tmp_path):
    cfg = Config.load("demo", [f"data.shards={tmp_path}/nowhere", "deepspeed.config=zero4.json"])
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    msg = str(err.value)
    assert f"data.shards='{tmp_path}/nowhere': no manifest.json" in msg
    assert "deepspeed.config='zero4.json': no such file" in msg and "did you mean 'zero3.json'" in msg


def test_global_batch_must_divide_across_ranks():
    cfg = Config.load("demo", ["train.global_batch_size=6", "train.grad_accum=1"])
    cfg.validate(world_size=3, check_paths=False)
    with pytest.raises(ConfigError, match="must divide across 4 ranks x 1 grad_accum"):
        cfg.validate(world_size=4, check_paths=False)


def test_unknown_preset_and_missing_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not a preset"):
        Config.load("vit_xl")
    with pytest.raises(ConfigError, match="no such file"):
        Config.load(str(tmp_path / "missing.yaml"))


def test_choice_lists_match_the_components():
    """config.py keeps its own copies of the components' choice lists (it imports no torch, so a bad
    config fails at once); a choice added on one side only would be refused, or reach a component
    that refuses it, so they must stay equal."""
    from mae_scale import config
    from mae_scale.data import loader, transforms
    from mae_scale.model import attention, masking, presets

    assert config.MASK_TYPES == masking.MASK_TYPES
    assert config.DECODER_MASK_TYPES == masking.DECODER_MASK_TYPES
    assert config.ATTENTION_BACKENDS == attention.BACKENDS
    assert set(config.MODEL_PRESETS) == set(presets.ARCHS)
    assert config.SHORT_VIDEO_POLICIES == transforms.SHORT_VIDEO_POLICIES
    assert config.REPEAT_SPANS == transforms.REPEAT_SPANS
    assert config.RESHARD_POLICIES == loader.RESHARD_POLICIES

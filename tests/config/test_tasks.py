"""The linear / finetune / distill sections: validated on creation naming the field, shipped recipes, and a task
recipe applied over a checkpoint's saved config."""
import pytest

from fastclr.config import ConfigError, load_config, to_dict
from fastclr.config.tasks import label_fraction


def test_label_fractions_and_files():
    assert label_fraction("1%") == 0.01 and label_fraction(" 10% ") == 0.1 and label_fraction("12.5%") == 0.125
    assert label_fraction("imagenet_subsets/1percent.txt") is None
    with pytest.raises(ValueError):
        label_fraction("0%")


@pytest.mark.parametrize("override,field", [
    ("finetune.labels=150%", "finetune.labels"), ("finetune.labels=", "finetune.labels"),
    ("finetune.from_head_layer=-1", "finetune.from_head_layer"), ("linear.optimizer=adam", "linear.optimizer"),
    ("linear.lr_scaling=cubic", "linear.lr_scaling"), ("distill.temperature=0", "distill.temperature"),
    ("distill.label_weight=1.5", "distill.label_weight"), ("distill.student_arch=vgg16", "distill.student_arch"),
    ("distill.warmup_epochs=400", "distill.warmup_epochs"), ("finetune.crop_area=[0.5,0.2]", "finetune.crop_area"),
    ("linear.global_batch_size=0", "linear.global_batch_size"),
])
def test_bad_values_fail_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        load_config(None, [override])


def test_a_label_file_need_not_exist_to_load_a_saved_config():
    """A config saved on another machine names a list this one may not have; the command checks the file."""
    assert load_config(None, ["finetune.labels=/elsewhere/1percent.txt"]).finetune.labels.endswith("1percent.txt")


def test_shipped_task_recipes_carry_the_papers_settings():
    one, ten = load_config("finetune_imagenet_1pct").finetune, load_config("finetune_imagenet_10pct").finetune
    assert (one.labels, one.epochs, ten.labels, ten.epochs) == ("1%", 60, "10%", 30)
    for f in (one, ten):
        assert (f.global_batch_size, f.optimizer, f.from_head_layer, f.weight_decay, f.warmup_epochs) == \
            (1024, "lars", 1, 0.0, 0.0)
        assert abs(f.base_lr * 1024 ** 0.5 - 0.16) < 1e-12 and f.lr_scaling == "sqrt"
    linear = load_config("linear_imagenet").linear
    assert (linear.global_batch_size, linear.epochs, linear.optimizer, linear.base_lr * 4096 / 256) == \
        (4096, 90, "sgd", 1.6)
    distill = load_config("distill_imagenet").distill
    assert (distill.temperature, distill.epochs, distill.global_batch_size, distill.weight_decay) == \
        (1.0, 400, 4096, 1e-4)
    assert abs(distill.base_lr * 4096 ** 0.5 - 6.4) < 1e-12


def test_a_task_recipe_applies_over_a_saved_config_section_by_section(tmp_path):
    saved = to_dict(load_config("cifar10_resnet18", ["data.path=train", "model.width_mult=0.25",
                                                     "finetune.subset_seed=7"]))
    recipe = tmp_path / "ft.yaml"
    recipe.write_text("finetune:\n  epochs: 12\n")
    cfg = load_config(str(recipe), ["finetune.labels=1%"], base=saved)
    assert cfg.model.width_mult == 0.25 and cfg.data.path == "train"  # the saved run's network and data
    assert (cfg.finetune.epochs, cfg.finetune.subset_seed, cfg.finetune.labels) == (12, 7, "1%")
    assert saved["finetune"]["epochs"] == 30  # the base is not modified

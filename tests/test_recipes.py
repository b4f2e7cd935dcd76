"""Recipe validation: every mistake is one line naming the file and dotted key."""

import pytest
import yaml

from helpers import run_cli
from vislearn.config import ConfigError
from vislearn.recipes import apply_override, bundled_recipes, load_recipe


def write_recipe(tmp_path, edit):
    recipe = yaml.safe_load(bundled_recipes()["dann_digits"].read_text())
    edit(recipe)
    path = tmp_path / "my_recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_bundled_recipes_validate():
    for name in bundled_recipes():
        load_recipe(name)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["model"].update(num_clases=10), r"model\.num_clases: unknown key \(did you mean 'num_classes'\?\)"),
    (lambda r: r["model"].update(gamma="fast"), r"model\.gamma: expected a number .* received 'fast'"),
    (lambda r: r["data"].update(batch_size=6.5), r"data\.batch_size: expected an integer"),
    (lambda r: r["train"].pop("seed"), r"train\.seed: missing value"),
    (lambda r: r["train"].update(jit_compile="yes"), r"train\.jit_compile: expected true, false or null"),
    (lambda r: r.pop("data"), r"data: missing section"),
    (lambda r: r.update(trian={}), r"trian: unknown section \(did you mean 'train'\?\)"),
    (lambda r: r["model"].update(name="danm"), r"model\.name: unknown value 'danm' \(did you mean 'dann'\?\)"),
    (lambda r: r["optimizer"]["schedule"].update(alhpa=1), r"optimizer\.schedule\.alhpa: unknown key"),
    (lambda r: r["distribute"].update(strategy="mirorred"), r"distribute\.strategy: unknown value"),
])
def test_validation_errors_name_file_and_key(tmp_path, edit, message):
    path = write_recipe(tmp_path, edit)
    with pytest.raises(ConfigError, match=message) as error:
        load_recipe(str(path))
    assert str(error.value).startswith(str(path))
    assert "\n" not in str(error.value)


def test_overrides_are_typed():
    recipe = {"train": {"epochs": 3}}
    apply_override(recipe, "train.epochs=1")
    apply_override(recipe, "model.label_units=[10, 20]")
    apply_override(recipe, "data.root=null")
    apply_override(recipe, "optimizer.learning_rate=0.5")
    assert recipe == {"train": {"epochs": 1}, "model": {"label_units": [10, 20]},
                      "data": {"root": None}, "optimizer": {"learning_rate": 0.5}}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override(recipe, "train.epochs")
    with pytest.raises(ConfigError, match="unknown section 'modle'"):
        apply_override(recipe, "modle.gamma=1")


def test_cli_reports_recipe_errors_in_one_line_with_exit_code_2(tmp_path):
    path = write_recipe(tmp_path, lambda r: r["model"].update(num_clases=10))
    result = run_cli("fit", path, "--run-dir", tmp_path / "run")
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert lines == [f"error: {path}: model.num_clases: unknown key (did you mean 'num_classes'?); "
                     "expected one of ['backbone', 'domain_loss_weight', 'domain_units', 'dropout', 'gamma', "
                     "'image_shape', 'label_units', 'lambda_max', 'mode', 'num_classes', 'total_steps']"]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()

    result = run_cli("fit", "dann_digitz")
    assert result.returncode == 2 and "did you mean 'dann_digits'" in result.stderr
    result = run_cli("fit", "dann_digits", "--set", "train.epochs=two")
    assert result.returncode == 2 and "train.epochs: expected an integer" in result.stderr


def test_recipes_command_lists_bundled_recipes():
    result = run_cli("recipes")
    assert result.returncode == 0
    assert "dann_digits" in result.stdout and "MNIST-M" in result.stdout

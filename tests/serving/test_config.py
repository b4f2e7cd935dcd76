"""models.config / batching / monitoring files, and `vislearn serving config`."""

import pytest
from click.testing import CliRunner

from vislearn.cli import main
from vislearn.config import ConfigError
from vislearn.serving.batching import read_batching_parameters, read_monitoring_config
from vislearn.serving.config import build_model_config, format_model_config, parse_model_config, read_model_config


def test_round_trip_with_policy_and_labels(base):
    config = build_model_config(base, policy="latest:2", labels=["classifier:stable=1", "canary=1"])
    text = format_model_config(config)
    again = parse_model_config(text)
    assert again == config
    models = {m.name: m for m in again.model_config_list.config}
    assert set(models) == {"classifier", "multi"}
    assert models["classifier"].model_version_policy.latest.num_versions == 2
    assert dict(models["classifier"].version_labels) == {"stable": 1, "canary": 1}
    assert dict(models["multi"].version_labels) == {"canary": 1}
    assert models["multi"].base_path == str((base / "multi").resolve())
    docker = build_model_config(base, policy="all", base_path="/models")
    assert {m.base_path for m in docker.model_config_list.config} == {"/models/classifier", "/models/multi"}


@pytest.mark.parametrize("text, expected", [
    ('model_config_list { config { nme: "a" } }', ":1: field 'nme':"),
    ('model_config_list { config { base_path: "/x" } }', "config[0].name: missing value"),
    ('model_config_list { config { name: "a" } }', "config[0].base_path: missing value"),
    ('model_config_list {\n config { name: "a" base_path: "/x" }\n config { name: "a" base_path: "/y" } }',
     "config[1].name: duplicate"),
    ('model_config_list { config { name: "a" base_path: "/x" model_platform: "onnx" } }', "model_platform"),
    ('model_config_list { config { name: "a" base_path: "/x" model_version_policy { specific { } } } }',
     "specific.versions: empty"),
])
def test_bad_model_config_names_file_and_field(tmp_path, text, expected):
    path = tmp_path / "models.config"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        read_model_config(path)
    message = str(error.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


def test_batching_and_monitoring_files(tmp_path):
    good = tmp_path / "batching_parameters.txt"
    good.write_text("max_batch_size { value: 32 }\nbatch_timeout_micros { value: 2000 }\n"
                    "num_batch_threads { value: 2 }\nmax_enqueued_batches { value: 8 }\n"
                    "allowed_batch_sizes: 8\nallowed_batch_sizes: 32\n")
    options = read_batching_parameters(good)
    assert (options.max_batch_size, options.batch_timeout_micros, options.num_batch_threads,
            options.max_enqueued_batches, options.allowed_batch_sizes) == (32, 2000, 2, 8, [8, 32])
    assert options.padded_size(5) == 8 and options.padded_size(9) == 32
    bad = tmp_path / "bad.txt"
    bad.write_text("max_batch_size { value: 32 }\nallowed_batch_sizes: 8\nallowed_batch_sizes: 16\n")
    with pytest.raises(ConfigError, match="bad.txt: allowed_batch_sizes: the last entry must equal"):
        read_batching_parameters(bad)
    bad.write_text("max_batch_size { value: 32 }\nmax_batch_sise { value: 1 }\n")
    with pytest.raises(ConfigError, match=r"bad.txt:2: .*max_batch_sise"):
        read_batching_parameters(bad)
    monitoring = tmp_path / "monitoring_config.txt"
    monitoring.write_text('prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }\n')
    assert read_monitoring_config(monitoring) == (True, "/monitoring/prometheus/metrics")


def test_cli_serving_config(base, tmp_path):
    runner = CliRunner()
    out = tmp_path / "models.config"
    result = runner.invoke(main, ["serving", "config", "--base", str(base), "--out", str(out), "--policy", "all",
                                  "--label", "classifier:stable=1"])
    assert result.exit_code == 0, result.output
    config = read_model_config(out)
    assert [m.name for m in config.model_config_list.config] == ["classifier", "multi"]
    result = runner.invoke(main, ["serving", "config", "--base", str(base), "--out", "-", "--policy", "newest"])
    assert result.exit_code == 2 and "error: --policy: expected latest" in result.output
    result = runner.invoke(main, ["serving", "config", "--base", str(base), "--out", "-", "--label", "nope:x=1"])
    assert result.exit_code == 2 and "no model 'nope'" in result.output
    result = runner.invoke(main, ["serve", "--model-config", str(tmp_path / "missing.config")])
    assert result.exit_code == 2 and "missing.config: model config file not found" in result.output

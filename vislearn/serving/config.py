"""`models.config` (TF Serving's `ModelServerConfig` text format): read, check, write.

The same file drives the real `tensorflow_model_server --model_config_file`
and `vislearn serve --model-config`, so it is parsed with TF Serving's own
protobuf (`tensorflow_serving.config.model_server_config_pb2`) and written
with `google.protobuf.text_format`: whatever one accepts, the other accepts.

Example:

```
model_config_list {
  config {
    name: "digits"
    base_path: "/models/digits"
    model_platform: "tensorflow"
    model_version_policy { latest { num_versions: 2 } }
    version_labels { key: "stable" value: 1 }
  }
}
```
"""

import re
from pathlib import Path

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from vislearn.config import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _field_at(text, line):
    """The `field:` named on a 1-based line of a text proto, for messages."""
    lines = text.splitlines()
    if 1 <= line <= len(lines):
        found = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*[:{]", lines[line - 1])
        if found:
            return found[-1]
    return None


def parse_model_config(text, source="<models.config>"):
    """Parse ModelServerConfig text and check it the way TF Serving does.

    Args:
        text: the text-format ModelServerConfig.
        source: file name used in error messages.

    Returns:
        A `model_server_config_pb2.ModelServerConfig`.

    Raises:
        ConfigError: one line naming `source`, the line and the field.
    """
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        message = str(error).splitlines()[0]
        line = error.GetLine() or 0
        field = _field_at(text, line) if line else None
        where = f"{source}:{line}" if line else source
        # The parser says "has no field named X"; lead with the field so the
        # user sees what to fix before the proto type name.
        prefix = f" field {field!r}:" if field else ""
        raise ConfigError(f"{where}:{prefix} {re.sub(r'^[0-9]+:[0-9]+ : ', '', message)}") from None
    check_model_config(config, source)
    return config


def check_model_config(config, source="<models.config>"):
    """Reject configs TF Serving would reject (or that vislearn cannot serve)."""
    if config.WhichOneof("config") == "custom_model_config":
        raise ConfigError(f"{source}: custom_model_config: not supported; use model_config_list")
    seen = set()
    for index, model in enumerate(config.model_config_list.config):
        where = f"{source}: model_config_list.config[{index}]"
        if not model.name:
            raise ConfigError(f"{where}.name: missing value (required)")
        if not _NAME.match(model.name):
            raise ConfigError(f"{where}.name: {model.name!r} is not a valid model name "
                              "(letters, digits, '_', '-', '.')")
        if model.name in seen:
            raise ConfigError(f"{where}.name: duplicate model name {model.name!r}")
        seen.add(model.name)
        if not model.base_path:
            raise ConfigError(f"{where}.base_path: missing value (required) for model {model.name!r}")
        if model.model_platform not in ("", "tensorflow"):
            raise ConfigError(f"{where}.model_platform: expected 'tensorflow', received {model.model_platform!r}")
        policy = model.model_version_policy
        kind = policy.WhichOneof("policy_choice")
        if kind == "latest" and policy.latest.num_versions < 0:
            raise ConfigError(f"{where}.model_version_policy.latest.num_versions: expected >= 1, "
                              f"received {policy.latest.num_versions}")
        if kind == "specific" and not policy.specific.versions:
            raise ConfigError(f"{where}.model_version_policy.specific.versions: empty; list at least one version")
        for label, version in model.version_labels.items():
            if version <= 0:
                raise ConfigError(f"{where}.version_labels[{label!r}]: expected a positive version, "
                                  f"received {version}")
    return config


def read_model_config(path):
    """Read and check a `models.config` file (see `parse_model_config`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: model config file not found")
    return parse_model_config(path.read_text(), str(path))


def parse_model_flag(value):
    """`NAME=PATH` (a `--model` flag) -> a ModelConfig with TF Serving's defaults."""
    name, sep, path = str(value).partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--model: expected NAME=PATH, received {value!r}")
    if not _NAME.match(name):
        raise ConfigError(f"--model: {name!r} is not a valid model name (letters, digits, '_', '-', '.')")
    config = model_server_config_pb2.ModelConfig(name=name, base_path=str(Path(path).resolve()),
                                                 model_platform="tensorflow")
    return config


def config_from_flags(values):
    """Several `--model NAME=PATH` flags -> a checked ModelServerConfig."""
    config = model_server_config_pb2.ModelServerConfig()
    for value in values:
        config.model_config_list.config.append(parse_model_flag(value))
    return check_model_config(config, "--model")


def versions_on_disk(base_path):
    """Numeric version folders under a model's base path, ascending."""
    base = Path(base_path)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def parse_policy(value):
    """`latest`, `latest:N`, `all` or `specific:V,V` -> (kind, numbers)."""
    kind, _, rest = str(value).partition(":")
    try:
        if kind == "latest":
            return "latest", [int(rest) if rest else 1]
        if kind == "all" and not rest:
            return "all", []
        if kind == "specific" and rest:
            return "specific", [int(v) for v in rest.split(",")]
    except ValueError:
        pass
    raise ConfigError(f"--policy: expected latest, latest:N, all or specific:V[,V...], received {value!r}")


def parse_label(value):
    """`[MODEL:]LABEL=VERSION` -> (model or None, label, version)."""
    left, sep, version = str(value).partition("=")
    model, _, label = left.rpartition(":")
    if not sep or not label or not version.isdigit() or int(version) <= 0:
        raise ConfigError(f"--label: expected [MODEL:]LABEL=VERSION, received {value!r}")
    return model or None, label, int(version)


def build_model_config(base, policy="latest", labels=(), base_path=None):
    """A ModelServerConfig for every model exported under `base`.

    Args:
        base: export base dir holding `NAME/VERSION/saved_model.pb`.
        policy: version policy for every model (`latest`, `latest:N`, `all`,
            `specific:V,V`).
        labels: `[MODEL:]LABEL=VERSION` strings; without MODEL the label is
            given to every model that has that version.
        base_path: the path the *server* sees `base` at (e.g. `/models` in the
            official Docker image); default: `base`, absolute.

    Returns:
        A `ModelServerConfig`.
    """
    base = Path(base)
    if not base.is_dir():
        raise ConfigError(f"--base {base}: not a directory")
    kind, numbers = parse_policy(policy)
    parsed_labels = [parse_label(label) for label in labels]
    models = sorted(p for p in base.iterdir()
                    if p.is_dir() and any((v / "saved_model.pb").is_file() for v in p.iterdir() if v.name.isdigit()))
    if not models:
        raise ConfigError(f"--base {base}: no exported models (expected NAME/VERSION/saved_model.pb)")
    known = {p.name for p in models}
    for model, label, _ in parsed_labels:
        if model is not None and model not in known:
            raise ConfigError(f"--label {model}:{label}: no model {model!r} under {base}; found {sorted(known)}")
    root = str(base.resolve()) if base_path is None else str(base_path).rstrip("/")
    config = model_server_config_pb2.ModelServerConfig()
    for folder in models:
        model = config.model_config_list.config.add(name=folder.name, base_path=f"{root}/{folder.name}",
                                                    model_platform="tensorflow")
        versions = versions_on_disk(folder)
        if kind == "latest":
            model.model_version_policy.latest.num_versions = numbers[0]
        elif kind == "all":
            model.model_version_policy.all.SetInParent()
        else:
            model.model_version_policy.specific.versions.extend(numbers)
        for owner, label, version in parsed_labels:
            if owner in (None, folder.name):
                if version not in versions:
                    if owner is not None:
                        raise ConfigError(f"--label {owner}:{label}={version}: {folder.name!r} has no version "
                                          f"{version}; found {versions}")
                    continue
                model.version_labels[label] = version
    return check_model_config(config, str(base))


def format_model_config(config):
    """ModelServerConfig -> text format (what `--model_config_file` reads)."""
    return text_format.MessageToString(config)


def write_model_config(config, path):
    """Write `config` in text format to `path`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_model_config(config))
    return path

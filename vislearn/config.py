"""Validation helpers shared by recipes, registries and the CLI.

A user mistake raises `ConfigError`, a `ValueError` whose message is one line
naming the file or dotted key, what was received and what was expected. The
CLI turns it into an error line and exit code 2.
"""

import difflib
import inspect


class ConfigError(ValueError):
    """A user's recipe, flag or data is not what vislearn expects."""


def suggestion(name, choices):
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def pick(registry, name, key):
    """Look `name` up in a name -> object mapping, or say what exists."""
    if name not in registry:
        raise ConfigError(
            f"{key}: unknown value {name!r}{suggestion(name, registry)}; expected one of {sorted(registry)}")
    return registry[name]


def _type_ok(value, default):
    if default is None or default is inspect.Parameter.empty or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, (str, dict))  # a str default may name a spec
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    if isinstance(default, dict):
        return isinstance(value, dict)
    return True


def _type_name(default):
    if isinstance(default, bool):
        return "a boolean"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, str):
        return "a string"
    if isinstance(default, (list, tuple)):
        return "a list"
    if isinstance(default, dict):
        return "a mapping"
    return type(default).__name__


def check_arguments(fn, section, where, skip=(), provided=()):
    """Check a recipe section's keys and value types against `fn`'s signature.

    Args:
        fn: the class or function the section's keys are passed to.
        section: dict of the recipe's keys for it (without `name`).
        where: prefix for messages, e.g. "recipes/dann.yaml: model".
        skip: parameters vislearn fills in itself (not settable in a recipe).
        provided: required parameters vislearn fills in when absent.
    """
    parameters = {
        n: p for n, p in inspect.signature(fn).parameters.items()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n not in ("self",) and n not in skip
    }
    for key, value in section.items():
        if key not in parameters:
            raise ConfigError(f"{where}.{key}: unknown key{suggestion(key, parameters)}; "
                              f"expected one of {sorted(parameters)}")
        default = parameters[key].default
        if not _type_ok(value, default):
            raise ConfigError(f"{where}.{key}: expected {_type_name(default)} (like {default!r}), "
                              f"received {value!r}")
    for key, parameter in parameters.items():
        if parameter.default is inspect.Parameter.empty and key not in section and key not in provided:
            raise ConfigError(f"{where}.{key}: missing value (required)")

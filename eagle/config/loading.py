"""Building a JobConfig: YAML file (local or s3://), dotted command-line overrides, the environment; errors
phrased for the person who wrote the config; YAML dumps without credentials, plain or with each setting's
description (a job's ``--print-config``)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from eagle.config.sections import ConfigError, JobConfig
from eagle.io.storage import read_bytes, storage_env_defaults


def _format_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, e["loc"][:-1])
            msg = f"unknown key; allowed here: {', '.join(allowed)}"
        got = f" (got {e.get('input')!r})" if e["type"] != "extra_forbidden" else ""
        lines.append(f"  {loc}: {msg}{got}")
    return "invalid config:\n" + "\n".join(lines)


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section at `loc` (for 'unknown key' messages)."""
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
    return sorted(getattr(current, "model_fields", {}))


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``['expert.batch_size=16', 'mllm.model=none']`` into a nested dict; values are YAML scalars/lists."""
    data: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return data


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_defaults(env: dict[str, str]) -> dict[str, Any]:
    """Conventional environment variables: the storage section's (owned by eagle.io.storage) and RAY_ADDRESS."""
    storage = storage_env_defaults(env)
    out: dict[str, Any] = {"storage": storage} if storage else {}
    if env.get("RAY_ADDRESS"):
        out["ray"] = {"address": env["RAY_ADDRESS"]}
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> JobConfig:
    """Build a JobConfig from (lowest to highest precedence) environment, a YAML file and overrides.

    Raises ConfigError naming the offending key and what is allowed, or the config file it cannot read.
    """
    data = _env_defaults(dict(os.environ) if env is None else env)
    if path is not None:
        try:
            text = Path(path).read_text() if "://" not in str(path) else read_bytes(str(path)).decode()
        except OSError as exc:
            raise ConfigError(f"cannot read the config file {path} ({type(exc).__name__}: {exc}); check the "
                              f"path given to --config") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = deep_merge(data, loaded)
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        data = deep_merge(data, extra)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, JobConfig)) from None


_SECRET_FIELDS = {"storage": {"access_key_id", "secret_access_key", "session_token"}}


def dump_config(cfg: JobConfig) -> str:
    """YAML that load_config reads back to an equal config. Credentials are never written."""
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude=_SECRET_FIELDS), sort_keys=False)


def description(field: FieldInfo) -> str | None:
    """A setting's description; a section's, when its field has none, is the first paragraph of its docstring."""
    if field.description:
        return field.description
    section = field.annotation
    if isinstance(section, type) and issubclass(section, BaseModel) and section.__doc__:
        return " ".join(section.__doc__.split("\n\n")[0].split())
    return None


def described_yaml(cfg: JobConfig, width: int = 118) -> str:
    """`dump_config`'s YAML with each setting's description as a comment above it: the effective config as a
    manual (it loads back to an equal config)."""
    head = ("# The effective job config: defaults, environment, config file and overrides applied. Credentials are "
            "never shown.")
    return "\n".join([*textwrap.wrap(head, width, initial_indent="", subsequent_indent="# "),
                      *_described(cfg, cfg.model_dump(mode="json", exclude=_SECRET_FIELDS), "", width)]) + "\n"


def _described(model: BaseModel, values: dict[str, Any], indent: str, width: int) -> list[str]:
    lines: list[str] = []
    for name, field in type(model).model_fields.items():
        if name not in values:  # a credential
            continue
        text = description(field)
        if text:
            lines += textwrap.wrap(text, width, initial_indent=f"{indent}# ",
                                   subsequent_indent=f"{indent}# ")
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            lines += [f"{indent}{name}:", *_described(value, values[name], indent + "  ", width)]
        else:
            flow = None if isinstance(values[name], (list, dict)) else False  # lists and maps on one line
            dumped = yaml.safe_dump({name: values[name]}, sort_keys=False, default_flow_style=flow,
                                    width=width - len(indent))
            lines += [indent + line for line in dumped.rstrip("\n").split("\n")]
    return lines

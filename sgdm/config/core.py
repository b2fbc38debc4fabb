"""Typed configuration: dataclasses validated once, errors that name the key path.

A config section is a plain ``@dataclass``. :func:`from_dict` builds one from a
mapping (parsed YAML), checking every key and type recursively; an unknown key,
a missing required key or a wrong type raises :class:`ConfigError` whose
message starts with the dotted key path (``model.unet.channels: expected int,
got str 'abc'``). Cross-field checks live in a ``validate(self)`` method on the
dataclass, called after construction; it should raise ``ConfigError`` with the
key path relative to that section (:func:`from_dict` prefixes the section path).

Supported field types: ``int`` (also an exactly integral float or scientific
notation: ``1e5``, ``1.0e5``), ``float`` (ints accepted), ``str``, ``bool``,
``pathlib.Path`` (from str, made absolute), ``Optional[X]`` / ``X | None``, ``Literal[...]``,
``list[X]``, ``tuple[X, ...]`` and fixed tuples, ``dict[str, X]`` and nested
dataclasses. No import strings, no ``eval``. Files and override values are read as YAML with
YAML 1.2's numbers (``010`` is ten, ``1:30`` is text); a ``~/`` path starts at the home folder.
"""
from __future__ import annotations

import dataclasses
import decimal
import math
import os
import pathlib
import re
import types
import typing
from typing import Any, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "load_yaml",
    "load_config",
    "dump_yaml",
    "require_at_least",
    "check_device",
    "check_kwargs",
    "absolute_paths",
    "check_known_keys",
    "located",
]


class ConfigError(ValueError):
    """A configuration value is wrong. ``key`` is the dotted path ("" for the root); ``where`` says where
    its value was written, when known (``exp.yaml, line 12``, ``the override train.lr=-1``: see
    :func:`located`), and the command line prints it after the message."""

    def __init__(self, key: str, message: str, where: str = ""):
        self.key = key
        self.message = message
        self.where = where
        super().__init__(f"{key}: {message}" if key else message)

    def prefixed(self, prefix: str) -> "ConfigError":
        if not prefix:
            return self
        key = f"{prefix}.{self.key}" if self.key else prefix
        return ConfigError(key, self.message, self.where)


def require_at_least(section: Any, minimum: int, *names: str) -> None:
    """For ``validate()`` hooks: each named field of ``section`` must be >= ``minimum``."""
    for name in names:
        value = getattr(section, name)
        if value < minimum:
            raise ConfigError(name, f"must be >= {minimum}, got {value}")


def check_seed(name: str, value: int) -> None:
    """A seed for ``torch.Generator().manual_seed``, which takes at most 2**64 - 1: [0, 2**63) leaves
    room for the offsets some streams add to it."""
    if not 0 <= value < 2**63:
        raise ConfigError(name, f"must be >= 0 and < 2**63, got {value}")


_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device(name: str, value: str) -> None:
    """For ``validate()`` hooks (and flags): ``value`` spells a device, ``auto``, ``cpu``, ``cuda`` or
    ``cuda:N``. Whether that device exists is checked where it is used (:func:`sgdm.devices.resolve_device`)."""
    if not _DEVICE.fullmatch(value):
        raise ConfigError(name, f"expected auto, cpu, cuda or cuda:N, got {value!r}")


def check_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    """For ``validate()`` hooks: keyword arguments passed on to a library (``backbone_kwargs``).

    ``{img_size:32}`` without a space after the colon is YAML for the key ``"img_size:32"`` with a
    null value, and timm drops null kwargs, so such a mapping would silently build the default model.
    """
    for key, value in kwargs.items():
        if ":" in str(key) or value is None:
            example = "{img_size: 32, patch_size: 8}"
            why = (f"the key {str(key)!r} holds a colon: YAML needs a space after each colon, "
                   f"write the mapping as {example}") if ":" in str(key) else \
                "null value, which the backbone would silently ignore; give a value or remove the key"
            raise ConfigError(_join(name, str(key)), why)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


# PyYAML reads 1e5 and 1.0e5 (no sign in the exponent) as strings, 1.0e+5 as a float
_SCIENTIFIC = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)[eE][+-]?\d+")
_ZERO_LED = re.compile(r"[+-]?0[0-9]+")


def _integral(value: Any) -> int | None:
    """The int an exactly integral float, a scientific-notation string (1e5, 1.0e5 -> 100000) or a decimal
    string with leading zeros (08 -> 8) spells, else None (1.5e0 is not an int)."""
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 2**53 else None
    if isinstance(value, str) and _ZERO_LED.fullmatch(value.strip()):  # 08, 09: text to YAML 1.1, decimal here
        return int(value.strip())
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        number = decimal.Decimal(value.strip())
        if number.adjusted() < 19 and number == number.to_integral_value():  # adjusted: no 1e999999 ints
            return int(number)
    return None


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:  # kwargs for a library (backbone_kwargs): 1e-1, text to PyYAML, is the number it spells
        return float(value) if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()) else value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, f"expected {_type_name(tp)}, got None")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError as err:
                errors.append(err.message)
        raise ConfigError(path, "; ".join(errors))
    if origin is typing.Literal:
        for arg in args:  # the same type too: 32.0 == 32 and True == 1, but neither is the choice 32 or 1
            if value == arg and type(value) is type(arg):
                return arg
        raise ConfigError(path, f"expected one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # `eval:` with every key commented out: the section's defaults, as an absent one
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping for {tp.__name__}, got {_describe(value)}")
        return from_dict(tp, value, path)
    if origin in (list, Sequence, typing.Sequence) or tp is list:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(path, _not_a_list(value))
        item = args[0] if args else Any
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(path, _not_a_list(value))
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(path, f"expected {len(args)} items, got {len(value)}")
        if not args:
            return tuple(value)
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping, got {_describe(value)}")
        kt, vt = args if args else (str, Any)
        return {_convert(kt, k, _join(path, str(k))): _convert(vt, v, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _integral(value)
        if number is not None:
            return number
        raise ConfigError(path, f"expected int, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(path, f"expected float, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        hint = (" (YAML reads unquoted no, off, yes, on as booleans: put the text in quotes, e.g. 'no')"
                if isinstance(value, bool) else "")
        raise ConfigError(path, f"expected str, got {_describe(value)}{hint}")
    if tp is pathlib.Path:
        if value == "":  # Path("") is the current folder: never what an empty key=, or "", meant
            raise ConfigError(path, "empty path; write . for the current folder (or null for none, where the key "
                                    "allows it)")
        if isinstance(value, (str, pathlib.PurePath)):  # ~ is the home folder, as in a shell (not ./~)
            return _absolute(pathlib.Path(value).expanduser())
        raise ConfigError(path, f"expected a path, got {_describe(value)}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(path, f"expected {_type_name(tp)}, got {_describe(value)}")


def _not_a_list(value: Any) -> str:
    hint = f"; write [{value}]: a list is in brackets" if isinstance(value, str) and "," in value else ""
    return f"expected a list, got {_describe(value)}{hint}"


def _absolute(value: Any) -> Any:
    """``value`` with every relative path in it made absolute against the current directory (``..``
    folded, symlinks kept); ``value`` itself when nothing changes. Paths are resolved once, as a config
    is loaded, so that a run's ``config.yaml`` and a store's manifest name the same files from any
    directory."""
    if isinstance(value, pathlib.PurePath):
        return value if value.is_absolute() and os.path.normpath(value) == str(value) else \
            pathlib.Path(os.path.abspath(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changed = {}
        for f in dataclasses.fields(value):
            old = getattr(value, f.name)
            new = _absolute(old)
            if new is not old and f.init:
                changed[f.name] = new
        return dataclasses.replace(value, **changed) if changed else value
    if isinstance(value, (list, tuple)):
        items = [_absolute(v) for v in value]
        return type(value)(items) if any(a is not b for a, b in zip(items, value)) else value
    return value


def absolute_paths(cls: type, data: Any, parts: tuple[str, ...] = ()) -> Any:
    """A copy of raw config data (parsed YAML) for dataclass ``cls`` whose path-typed values are made
    absolute as :func:`from_dict` makes them, other values and unknown keys as they are: to compare a
    config saved by an older sgdm, which kept relative paths, with one loaded now."""
    if isinstance(data, dict):
        return {k: absolute_paths(cls, v, parts + (str(k),)) for k, v in data.items()}
    tp = _field_type(cls, parts) if parts else None
    if typing.get_origin(_without_none(tp)) is list:
        tp = typing.get_args(_without_none(tp))[0]
        return [_absolute_text(v) if _without_none(tp) is pathlib.Path and isinstance(v, str) else v
                for v in data] if isinstance(data, list) else data
    return _absolute_text(data) if _without_none(tp) is pathlib.Path and isinstance(data, str) else data


def _absolute_text(text: str) -> str:
    return os.path.abspath(os.path.expanduser(text))


def check_known_keys(cls: type, data: Any, path: str = "") -> None:
    """Every key of raw config data (parsed YAML) names a field of dataclass ``cls``, in nested sections too;
    a ConfigError like :func:`from_dict`'s otherwise. Values are not checked: for a command that reads some
    sections and takes the others (the same config and overrides as ``train``) without building them."""
    if not isinstance(data, Mapping):
        return
    hints = typing.get_type_hints(cls)
    _refuse_unknown(data, [f.name for f in dataclasses.fields(cls) if f.init], path)
    for key, value in data.items():
        tp = _without_none(hints[key])
        if dataclasses.is_dataclass(tp):
            check_known_keys(tp, value, _join(path, key))


def _refuse_unknown(data: Mapping, fields, path: str) -> None:
    """A ConfigError naming the first key of ``data`` that is not one of ``fields``, listing them."""
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = str(unknown[0])
        head, *rest = key.split(".")
        nested = "..."
        for part in reversed(rest):
            nested = f"{{{part}: {nested}}}"
        nest = f"; a dotted key is for overrides; in a file, nest it: {head}: {nested}" if rest and head in fields else ""
        raise ConfigError(_join(path, key), f"unknown key (known keys here: {', '.join(sorted(fields))}){nest}")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, checking keys and types recursively.

    Relative paths (``pathlib.Path`` fields, defaults included) become absolute against the current
    directory."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"expected a mapping for {cls.__name__}, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    _refuse_unknown(data, fields, path)
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(_join(path, name), "required key is missing")
        else:  # a default path (annotation.store: annotations) is as relative as a written one
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            resolved = _absolute(default)
            if resolved is not default:
                kwargs[name] = resolved
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as err:
            raise err.prefixed(path) from None
    _refuse_non_finite(obj, hints, path)  # after validate(), whose own message says more where it checks
    return obj


def _refuse_non_finite(obj: Any, hints: Mapping[str, Any], path: str) -> None:
    """A ConfigError for a float field of ``obj`` (or an item of a list of them) that is nan or inf: no
    setting means either, and ``nan`` passes every ``value < limit`` check a section might make."""
    for name, tp in hints.items():
        value, tp = getattr(obj, name, None), _without_none(tp)
        if tp is float:
            items = [(_join(path, name), value)]
        elif typing.get_origin(tp) in (list, tuple) and float in typing.get_args(tp) and isinstance(value, (list, tuple)):
            items = [(f"{_join(path, name)}[{i}]", v) for i, v in enumerate(value)]
        else:
            continue
        for key, v in items:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(key, f"expected a finite number, got {v}")


def to_dict(obj: Any) -> Any:
    """Plain YAML-able data from a config dataclass (paths become strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    return obj


def apply_overrides(data: dict, overrides: Sequence[str], cls: type | None = None) -> dict:
    """Apply ``a.b.c=value`` overrides to a nested dict, in place.

    The value is parsed as YAML, except for a ``str`` or path field of dataclass ``cls`` (when given):
    there the text is taken as written (``run.name=exp #3``, ``run.name=0755``), stripped of surrounding
    whitespace and of one pair of enclosing quotes; ``null`` or ``~`` sets an optional one to None, and
    ``null`` or ``~`` for a path that cannot be None is refused as in a file (``~/`` is the home folder).
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError("", f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError("", f"override {item!r} has an empty key")
        parts = key.split(".")
        if cls is not None:
            _refuse_inside_list(cls, parts)
        value = _override_value(raw, key, _field_type(cls, parts) if cls is not None else None)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, list):
                raise ConfigError(".".join(parts[: i + 1]), "is a list: an override sets it whole, e.g. "
                                                            f"{'.'.join(parts[: i + 1])}=[...]")
            elif not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), "is not a mapping; cannot override a key inside it")
            node = child
        node[parts[-1]] = value
    return data


def _refuse_inside_list(cls: Any, parts: Sequence[str]) -> None:
    """A ConfigError when ``parts`` leads into a list field of dataclass ``cls`` (``train.betas.0=0.5``),
    giving the whole-list override with the field's default as the example."""
    default: Any = cls
    for i in range(1, len(parts)):
        tp = _without_none(_field_type(cls, parts[:i]))
        field = {f.name: f for f in dataclasses.fields(default)}.get(parts[i - 1]) \
            if dataclasses.is_dataclass(default) else None
        default = None if field is None else field.default if field.default is not dataclasses.MISSING else \
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None
        if typing.get_origin(tp) in (list, tuple) or tp in (list, tuple):
            name = ".".join(parts[:i])
            example = yaml.safe_dump(list(default), default_flow_style=True).strip() if default else "[...]"
            raise ConfigError(name, f"is a list: an override sets it whole, e.g. {name}={example}")
        if tp is None:
            return


def _field_type(cls: Any, parts: Sequence[str]) -> Any:
    """The declared type at ``parts`` below dataclass ``cls`` (None where the path leaves the dataclasses)."""
    tp = cls
    for part in parts:
        tp = _without_none(tp)
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def _without_none(tp: Any) -> Any:
    """X for ``Optional[X]``; ``tp`` otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


_YAML_NULL = ("null", "Null", "NULL", "~")

_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` reading numbers as YAML 1.2 does: ``010`` is ten, not YAML 1.1's octal 8
    (``train.max_steps=010`` trained 8 steps), and ``1:30`` is text, not 90 in base 60. Only text that
    YAML 1.1 read as a number changes (``09``, text there, stays text), so whatever ``yaml.safe_dump``
    wrote (a run's config.yaml, ``--print-config``) reads back the same."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT_TAG, re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
                              list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT_TAG, re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text.lstrip("+"))
    base = {"0b": 2, "0x": 16}.get(digits[:2], 10)
    try:
        return sign * int(digits[2:] if base != 10 else digits, base)
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not an integer", node.start_mark) from None


_Loader.add_constructor(_INT_TAG, _construct_int)


def _override_value(raw: str, key: str, tp: Any) -> Any:
    text = raw.strip()
    if _without_none(tp) in (str, pathlib.Path):
        if text in _YAML_NULL and _without_none(tp) is not tp:
            return None
        if text in _YAML_NULL and tp is pathlib.Path:  # refused as in a file: not a folder called null, nor ~ itself
            return None
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            try:
                unquoted = yaml.safe_load(text)
            except yaml.YAMLError:
                unquoted = None
            if isinstance(unquoted, str):
                return unquoted
        return text
    try:
        return yaml.load(raw, Loader=_Loader) if text else ""
    except yaml.YAMLError as err:
        raise ConfigError(key, f"cannot parse override value {raw!r}: {err}") from None


class _Document(dict):
    """A config file's top-level mapping, which remembers the file (``source``) and the line each key
    path was written on (``lines``: ``{"train.lr": 12, "train.sample_scales[1]": 14}``), so that an
    error about a value can say where it was written (:func:`located`)."""

    source: str = ""
    lines: dict = {}


def _load_unique_keys(text: str, source: str, lines: dict[str, int] | None = None) -> Any:
    """``yaml.safe_load``, refusing a key written twice in one mapping (PyYAML keeps the last one, so a
    second ``train:`` block would silently replace the first); ``lines`` receives each key path's line."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node, "", source, {} if lines is None else lines)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_unique_keys(node: yaml.Node, path: str, source: str, where: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if name in lines:
                    raise ConfigError(_join(path, name), f"written twice in {source} (lines {lines[name]} and "
                                                         f"{line}); keep one")
                lines[name] = line
                where.setdefault(_join(path, name), line)
            _check_unique_keys(value, _join(path, name) if name is not None else path, source, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            where.setdefault(f"{path}[{i}]", item.start_mark.line + 1)
            _check_unique_keys(item, f"{path}[{i}]", source, where)


def _within(key: str, section: str) -> bool:
    """Whether dotted ``key`` is ``section`` or lies inside it (``train.betas[0]`` lies in ``train``)."""
    return key == section or key.startswith(section + ".") or key.startswith(section + "[")


def located(err: ConfigError, data: Mapping, overrides: Sequence[str] = ()) -> ConfigError:
    """``err`` (about the config ``data`` that :func:`load_yaml` read and ``overrides`` changed) with its
    ``where``: the last override that set its key or a section it lies in (``the override train.lr=-1``),
    else the file and line (``exp.yaml, line 12``), else that the value is the default."""
    if not err.key or err.where:
        return err
    key, where = err.key, ""
    for item in reversed(overrides):
        written = item.split("=", 1)[0].strip()
        if _within(key, written) or _within(written, key):
            where = f"the override {item.strip()}"
            break
    source, lines = getattr(data, "source", ""), getattr(data, "lines", {})
    for part in (key, key.split("[", 1)[0]):  # a list item without a line of its own: the list's
        if not where and part in lines:
            where = f"{source}, line {lines[part]}"
    if not where and source and "required key is missing" not in err.message:
        where = f"the default: neither {source} nor an override sets it"
    return ConfigError(key, err.message, where) if where else err


def load_yaml(path: str | pathlib.Path) -> dict:
    """The top-level mapping of YAML file ``path`` (``~`` expanded; an empty file is ``{}``), as a dict
    that remembers the file and each key's line for error messages. A missing file, a folder, text
    that is not UTF-8 or not YAML, a repeated key or a top level that is not a mapping is a
    :class:`ConfigError` naming the file."""
    path = pathlib.Path(path).expanduser()  # ~/exp.yaml, as a path inside a config may be written
    if path.is_dir():
        raise ConfigError("", f"config file {path} is a folder; give the YAML file in it")
    if not path.exists():
        raise ConfigError("", f"config file {path} does not exist")
    lines: dict[str, int] = {}
    try:  # a regular file, or a pipe (/dev/stdin)
        data = _load_unique_keys(path.read_bytes().decode("utf-8"), str(path), lines)
    except OSError as err:
        raise ConfigError("", f"cannot read config file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError("", f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError("", f"{path}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: the top level must be a mapping, got {type(data).__name__}")
    document = _Document(data)
    document.source, document.lines = str(path), lines
    return document


def load_config(cls: type[T], path: str | pathlib.Path | None, overrides: Sequence[str] = ()) -> T:
    """Load YAML ``path`` (or nothing), apply dotted overrides, validate into ``cls``; an error says where
    the wrong value was written (:func:`located`)."""
    data = load_yaml(path) if path is not None else {}
    apply_overrides(data, overrides, cls)
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        raise located(err, data, overrides) from None


def dump_yaml(obj: Any) -> str:
    """``obj`` (a config dataclass or plain data) as YAML text, keys in field order (:func:`to_dict`)."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False)

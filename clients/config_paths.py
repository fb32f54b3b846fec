"""Dotted paths into ``ClusterConfig`` ("migration.migrate_out_threshold"): lookup, typed parsing, FieldMask updates.

Parsing happens on the client so a typo or a bad value is reported before anything reaches the cluster. Enum values
are accepted by name, case-insensitively, with or without the type's prefix, with '-' for '_' and "++" for "_PP"
("round-robin", "infaas++", "sr"); scalars by the field's type; message and list fields as JSON.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from google.protobuf import descriptor, field_mask_pb2, json_format
from google.protobuf.message import Message

from pyllumnix.clients.errors import InvalidArgumentError
from pyllumnix.protos.llumnix.v1 import config_pb2

FD = descriptor.FieldDescriptor

_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
_TRUE = {"true", "yes", "on", "1", "y", "t"}
_FALSE = {"false", "no", "off", "0", "n", "f"}


class ConfigPathError(InvalidArgumentError):
    """An unknown config key or a value that does not fit its field (raised before any call is made)."""


def _is_repeated(field: descriptor.FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _is_message(field: descriptor.FieldDescriptor) -> bool:
    return field.type == FD.TYPE_MESSAGE


def _message_type(field: descriptor.FieldDescriptor) -> descriptor.Descriptor:
    assert field.message_type is not None, field.full_name
    return field.message_type


def _enum_type(field: descriptor.FieldDescriptor) -> descriptor.EnumDescriptor:
    assert field.enum_type is not None, field.full_name
    return field.enum_type


def resolve(path: str, root: descriptor.Descriptor = config_pb2.ClusterConfig.DESCRIPTOR) -> list[FD]:
    """The chain of fields named by ``path``; raises ConfigPathError naming the valid keys at the failing level."""
    parts = path.strip().split(".")
    if not path.strip() or any(not p for p in parts):
        raise ConfigPathError(f"empty config key {path!r}")
    chain: list[FD] = []
    msg: descriptor.Descriptor | None = root
    for i, part in enumerate(parts):
        if msg is None:
            raise ConfigPathError(f"unknown config key {path!r}: {'.'.join(parts[:i])} has no sub-keys")
        field = msg.fields_by_name.get(part)
        if field is None:
            choices = ", ".join(f.name for f in msg.fields)
            where = ".".join(parts[:i]) or "the config"
            raise ConfigPathError(f"unknown config key {path!r}: {where} has keys {choices}")
        chain.append(field)
        msg = _message_type(field) if _is_message(field) and not _is_repeated(field) else None
    return chain


def all_paths(root: descriptor.Descriptor = config_pb2.ClusterConfig.DESCRIPTOR, prefix: str = "") -> list[str]:
    """Every leaf key (scalar, enum or list field), in declaration order."""
    out: list[str] = []
    for field in root.fields:
        name = f"{prefix}{field.name}"
        if _is_message(field) and not _is_repeated(field):
            out += all_paths(_message_type(field), name + ".")
        else:
            out.append(name)
    return out


def _enum_prefix(enum: descriptor.EnumDescriptor) -> str:
    names = [v.name for v in enum.values]
    common = names[0]
    for name in names[1:]:
        while not name.startswith(common):
            common = common[:-1]
    return common[: common.rfind("_") + 1] if "_" in common else ""


def enum_choices(enum: descriptor.EnumDescriptor) -> list[str]:
    """Short lower-case names of an enum's settable values ("llumnix", "infaas_pp", ...)."""
    prefix = _enum_prefix(enum)
    return [v.name[len(prefix) :].lower() for v in enum.values if v.number != 0]


def parse_enum(enum: descriptor.EnumDescriptor, text: str, name: str = "") -> int:
    """Enum number for ``text`` (name with or without prefix, any case, '-'/' ' for '_', "++" for "_PP", or number)."""
    raw = text.strip()
    prefix = _enum_prefix(enum)
    by_number = {v.number: v for v in enum.values}
    if re.fullmatch(r"-?\d+", raw):
        value = by_number.get(int(raw))
    else:
        key = raw.upper().replace("++", "_PP").replace("-", "_").replace(" ", "_")
        value = enum.values_by_name.get(key) or enum.values_by_name.get(prefix + key)
    if value is None or value.number == 0:
        raise ConfigPathError(
            f"bad value {text!r} for {name or enum.name}: expected one of {', '.join(enum_choices(enum))}"
        )
    return int(value.number)


def parse_scalar(field: descriptor.FieldDescriptor, text: str, name: str = "") -> Any:
    """``text`` converted to the Python value of a non-message field (``name`` is the key used in messages)."""
    raw = text.strip()
    name = name or field.name
    if field.type == FD.TYPE_BOOL:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigPathError(f"bad value {text!r} for {name}: expected true or false")
    if field.type in _INT_RANGES:
        try:
            value = int(raw.replace("_", ""), 10)
        except ValueError:
            raise ConfigPathError(f"bad value {text!r} for {name}: expected an integer") from None
        lo, hi = _INT_RANGES[field.type]
        if not lo <= value <= hi:
            raise ConfigPathError(f"bad value {text!r} for {name}: out of range [{lo}, {hi}]")
        return value
    if field.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        try:
            num = float(raw)
        except ValueError:
            raise ConfigPathError(f"bad value {text!r} for {name}: expected a number") from None
        if math.isnan(num):
            raise ConfigPathError(f"bad value {text!r} for {name}: NaN is not allowed")
        return num
    if field.type == FD.TYPE_ENUM:
        return parse_enum(_enum_type(field), raw, name)
    if field.type == FD.TYPE_STRING:
        return text
    raise ConfigPathError(f"{name}: fields of this type cannot be set from the command line")


def _coerce(field: descriptor.FieldDescriptor, value: Any, name: str) -> Any:
    """A typed Python value (or text) checked against a scalar field."""
    if isinstance(value, str):
        return parse_scalar(field, value, name)
    if field.type == FD.TYPE_BOOL:
        if not isinstance(value, bool):
            raise ConfigPathError(f"bad value {value!r} for {name}: expected a bool")
        return value
    if field.type in _INT_RANGES:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigPathError(f"bad value {value!r} for {name}: expected an integer")
        return parse_scalar(field, str(value), name)
    if field.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigPathError(f"bad value {value!r} for {name}: expected a number")
        return parse_scalar(field, repr(float(value)), name)
    if field.type == FD.TYPE_ENUM:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigPathError(f"bad value {value!r} for {name}: expected an enum name or number")
        return parse_enum(_enum_type(field), str(value), name)
    raise ConfigPathError(f"bad value {value!r} for {name}")


def set_path(config: config_pb2.ClusterConfig, path: str, value: Any) -> None:
    """Writes ``value`` (text to parse, a typed value, or JSON/dict/list for message and list fields) at ``path``."""
    chain = resolve(path)
    msg: Message = config
    for field in chain[:-1]:
        msg = getattr(msg, field.name)
    leaf = chain[-1]
    if _is_message(leaf) or _is_repeated(leaf):
        data = value
        if isinstance(value, str):
            try:
                data = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigPathError(f"bad value for {path}: expected JSON ({exc.msg})") from None
            except RecursionError:
                # The value is the caller's: a ConfigPathError (a usage error in llmctl), never a traceback.
                raise ConfigPathError(f"bad value for {path}: the JSON is nested too deeply") from None
        if isinstance(data, Message):
            if _is_repeated(leaf):
                raise ConfigPathError(f"bad value for {path}: expected a list, got a {data.DESCRIPTOR.full_name}")
            try:
                getattr(msg, leaf.name).CopyFrom(data)
            except TypeError as exc:
                raise ConfigPathError(f"bad value for {path}: {exc}") from None
            return
        wrapper = msg.__class__()
        try:
            json_format.ParseDict({leaf.name: data}, wrapper)
        except (json_format.ParseError, ValueError, TypeError) as exc:
            raise ConfigPathError(f"bad value for {path}: {exc}") from None
        except RecursionError:
            raise ConfigPathError(f"bad value for {path}: the value is nested too deeply") from None
        msg.ClearField(leaf.name)
        msg.MergeFrom(wrapper)
        return
    setattr(msg, leaf.name, _coerce(leaf, value, path))


def make_update(updates: Mapping[str, Any]) -> tuple[config_pb2.ClusterConfig, field_mask_pb2.FieldMask]:
    """A partial config holding ``updates`` and the FieldMask naming exactly those paths."""
    if not updates:
        raise ConfigPathError("no config keys to set")
    config = config_pb2.ClusterConfig()
    mask = field_mask_pb2.FieldMask()
    for path, value in updates.items():
        set_path(config, path, value)
        mask.paths.append(".".join(f.name for f in resolve(path)))
    return config, mask


def get_path(config: config_pb2.ClusterConfig, path: str) -> Any:
    """The value at ``path`` as plain data: enum names, JSON-like dicts/lists for messages, None for unset optionals."""
    chain = resolve(path)
    msg: Message = config
    for field in chain[:-1]:
        msg = getattr(msg, field.name)
    leaf = chain[-1]
    if _is_message(leaf) or _is_repeated(leaf):
        wrapper_dict = json_format.MessageToDict(msg, preserving_proto_field_name=True)
        if _is_repeated(leaf):
            return wrapper_dict.get(leaf.name, [])
        return json_format.MessageToDict(getattr(msg, leaf.name), preserving_proto_field_name=True)
    if leaf.has_presence and not msg.HasField(leaf.name):
        return None
    value = getattr(msg, leaf.name)
    if leaf.type == FD.TYPE_ENUM:
        enum_value = _enum_type(leaf).values_by_number.get(value)
        return enum_value.name if enum_value is not None else value
    return value


def format_value(value: Any) -> str:
    """A value from :func:`get_path` as one line of text."""
    if value is None:
        return "(default)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)

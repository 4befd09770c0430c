"""Proto JSON of shoal.v1 messages with readable errors: one rule for every JSONL reader.

`parse_message(obj, pb.GenerateRequest)` reads a JSON object with protobuf's own
`json_format` (snake_case or lowerCamelCase names, full enum names or numbers, 64-bit
integers as strings or numbers), plus the short priority names ("HIGH", "low") as an
extension; every error names the field. It lives beside the generated stubs because both
`python -m worker.batch` (through server/proto_json.py) and `python -m client batch` use
it, and client/ may not import server/.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from shoal.v1 import inference_pb2 as pb

PRIORITY_PREFIX = "PRIORITY_"
# The short priority names (any case), a documented extension of proto JSON.
SHORT_PRIORITIES = [n.removeprefix(PRIORITY_PREFIX) for n in pb.Priority.DESCRIPTOR.values_by_name]


def parse_message(obj: Any, cls: type[Message]) -> Any:
    """Proto JSON object -> message of `cls`; ValueError naming the field on any fault."""
    if not isinstance(obj, dict):
        raise ValueError("a request must be a JSON object")
    obj = _short_priority(obj, cls.DESCRIPTOR)
    fault = _explain(obj, cls.DESCRIPTOR, "", values=False)  # json_format takes duplicates
    if fault:
        raise ValueError(fault)
    message = cls()
    try:
        json_format.ParseDict(obj, message)
    except json_format.ParseError as err:
        raise ValueError(_explain(obj, cls.DESCRIPTOR, "") or _first_line(err)) from None
    return message


def _short_priority(obj: dict[str, Any], descriptor: Descriptor) -> dict[str, Any]:
    field = descriptor.fields_by_name.get("priority")
    value = obj.get("priority")
    if field is None or field.enum_type is not pb.Priority.DESCRIPTOR or not isinstance(value, str):
        return obj
    short = value.strip().upper().removeprefix(PRIORITY_PREFIX)
    return {**obj, "priority": PRIORITY_PREFIX + short} if short in SHORT_PRIORITIES else obj


def _explain(
    obj: dict[str, Any], descriptor: Descriptor, path: str, values: bool = True
) -> str | None:
    """The first fault in `obj` as "<field> must be ... (got ...)"; None if none is found.
    With values=False only the names are checked (unknown, or one field given twice)."""
    seen: dict[str, str] = {}
    by_json = {f.json_name: f for f in descriptor.fields}
    for key, value in obj.items():
        field = descriptor.fields_by_name.get(key) or by_json.get(key)
        if field is None:
            return f"unknown field {path + key!r}"
        name = path + field.name
        if field.name in seen:
            return f"{name} is given twice (as {seen[field.name]!r} and {key!r})"
        seen[field.name] = key
        fault = _explain_value(field, key, value, name, values)
        if fault:
            return fault
    return None


def _explain_value(
    field: FieldDescriptor, key: str, value: Any, name: str, values: bool
) -> str | None:
    if value is None or not (values or field.message_type is not None):
        return None  # null is the field's default; a scalar's name was checked already
    if not _repeated(field):
        items: list[tuple[str, Any]] = [(name, value)]
    elif isinstance(value, list):
        items = [(f"{name}[{i}]", item) for i, item in enumerate(value)]
    else:
        return (
            f"{name} must be a list of {_kind(field, plural=True)} (got {value!r})"
            if values
            else None
        )
    for where, item in items:
        if field.message_type is None:
            fault = (
                None
                if _scalar_ok(field, key, item)
                else f"{where} must be {_kind(field)} (got {item!r})"
            )
        elif isinstance(item, dict):
            fault = _explain(item, field.message_type, where + ".", values)
        else:
            fault = f"{where} must be an object (got {item!r})" if values else None
        if fault:
            return fault
    return None


def _scalar_ok(field: FieldDescriptor, key: str, item: Any) -> bool:
    probe = message_factory.GetMessageClass(field.containing_type)()
    try:
        json_format.ParseDict({key: [item] if _repeated(field) else item}, probe)
    except json_format.ParseError:
        return False
    return True


def _repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 5.28; `label` is gone in 7
        return bool(field.is_repeated)
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)


_INTEGER_RANGES = {
    FieldDescriptor.TYPE_UINT32: "[0, 2**32)",
    FieldDescriptor.TYPE_UINT64: "[0, 2**64)",
    FieldDescriptor.TYPE_INT32: "[-2**31, 2**31)",
    FieldDescriptor.TYPE_INT64: "[-2**63, 2**63)",
}


def _kind(field: FieldDescriptor, plural: bool = False) -> str:
    """What a value of this field must be, in words."""
    if field.message_type is not None:
        return "objects" if plural else "an object"
    if field.enum_type is not None:
        names = [v.name for v in field.enum_type.values]
        text = "one of " + ", ".join(names)
        if field.enum_type is pb.Priority.DESCRIPTOR:
            text += " (or " + ", ".join(SHORT_PRIORITIES[1:]) + ")"
        return ("names " + text) if plural else text
    if field.type in _INTEGER_RANGES:
        kind = f"integer{'s' if plural else ''} in {_INTEGER_RANGES[field.type]}"
        return kind if plural else f"an {kind}"
    if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return "numbers" if plural else "a number"
    if field.type == FieldDescriptor.TYPE_BOOL:
        return "true or false"
    return "strings" if plural else "a string"


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0]

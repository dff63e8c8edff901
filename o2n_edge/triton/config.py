"""``config.pbtxt`` for each model of the repository, rendered from plain dicts and checked.

Why render by hand and then parse: the writer must run where only the base install is present
(no protobuf, no tritonclient), yet a config Triton cannot parse only shows up when the server
refuses to load the model. So the text comes from a tiny serializer of nested dicts (protobuf's
text format), and :func:`check_config` parses it with Triton's own ``ModelConfig`` message
(``tritonclient.grpc.model_config_pb2``) wherever tritonclient is installed: the writer does so
when it can, and the tests always do.
"""

from __future__ import annotations

from typing import Any, Mapping

# manifest dtype -> Triton data type
TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}
# Enum-valued fields are written bare (protobuf text format), every other string quoted.
ENUM_FIELDS = frozenset({"data_type", "kind"})


class ConfigError(ValueError):
    """A config that Triton's model-config protobuf refuses (the message says where)."""


def _scalar(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if key in ENUM_FIELDS:
        return str(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def _lines(msg: Mapping[str, Any], indent: int) -> list[str]:
    pad = "  " * indent
    out: list[str] = []
    for key, value in msg.items():
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and items and not isinstance(items[0], Mapping):
            out.append(f"{pad}{key}: [ {', '.join(_scalar(key, v) for v in items)} ]")
            continue
        if isinstance(value, list) and not items:
            out.append(f"{pad}{key}: [ ]")
            continue
        for item in items:
            if isinstance(item, Mapping):
                out.append(f"{pad}{key} {{")
                out.extend(_lines(item, indent + 1))
                out.append(f"{pad}}}")
            else:
                out.append(f"{pad}{key}: {_scalar(key, item)}")
    return out


def render(config: Mapping[str, Any]) -> str:
    """Nested dicts/lists -> protobuf text format (lists of dicts = repeated messages)."""
    return "\n".join(_lines(config, 0)) + "\n"


def parameters(values: Mapping[str, str]) -> list[dict[str, Any]]:
    """Triton's ``parameters`` map (string values) as repeated key/value entries."""
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in values.items()]


def check_config(text: str, where: str = "config.pbtxt") -> Any:
    """Parse ``text`` as Triton's ``ModelConfig``; return the message or raise ConfigError.

    Raises ImportError when tritonclient (``o2n-edge[triton]``) is not installed.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    msg = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        raise ConfigError(f"{where}: Triton's ModelConfig refuses it: {exc}") from exc
    return msg


def try_check_config(text: str, where: str) -> bool:
    """:func:`check_config` where tritonclient is installed; False (unchecked) where not."""
    try:
        check_config(text, where)
    except ImportError:
        return False
    return True

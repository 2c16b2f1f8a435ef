"""The OTLP Resource and InstrumentationScope (protobuf messages) the exported metrics carry, built once from the settings (spans carry the SDK's, exporters/spans.py)."""
from __future__ import annotations

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from . import semconv
from .settings import TelemetrySettings


def any_value_message(value: str | bool | int | float) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    return AnyValue(string_value=str(value))


def resource(settings: TelemetrySettings) -> Resource:
    return Resource(attributes=[KeyValue(key=k, value=any_value_message(v)) for k, v in settings.resource_attributes])


def scope() -> InstrumentationScope:
    return InstrumentationScope(name=semconv.SCOPE_NAME, version=semconv.SCOPE_VERSION)

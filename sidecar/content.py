"""Prompt and completion content in the OpenTelemetry GenAI message form, only for `telemetry.capture_content: true`.

Text parts only; other parts (images, audio, tool calls) are named by type without their data.
Streamed completions are not captured (the sidecar does not keep a stream's text).
"""
from __future__ import annotations

from typing import Any

import orjson


def input_messages(adapter: str, body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    messages: list[dict[str, Any]] = []
    if adapter == "gemini":
        system = body.get("systemInstruction") or body.get("system_instruction")
        if isinstance(system, dict):
            messages.append({"role": "system", "parts": _gemini_parts(system.get("parts"))})
        for item in body.get("contents") or ():
            if isinstance(item, dict):
                messages.append({"role": item.get("role", "user"), "parts": _gemini_parts(item.get("parts"))})
    else:
        if adapter == "anthropic" and body.get("system"):
            messages.append({"role": "system", "parts": _parts(body["system"])})
        source = body.get("messages")
        if source is None and "input" in body:  # OpenAI Responses API
            source = [{"role": "user", "content": body["input"]}] if isinstance(body["input"], str) else body["input"]
        if source is None and "prompt" in body:  # legacy completions
            source = [{"role": "user", "content": body["prompt"]}]
        for item in source or ():
            if isinstance(item, dict):
                messages.append({"role": item.get("role", "user"), "parts": _parts(item.get("content"))})
    return orjson.dumps(messages).decode() if messages else None


def output_messages(adapter: str, doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return None
    messages: list[dict[str, Any]] = []
    if adapter == "gemini":
        for c in doc.get("candidates") or ():
            content = c.get("content") or {}
            messages.append({"role": "assistant", "parts": _gemini_parts(content.get("parts")),
                             "finish_reason": str(c.get("finishReason", "")).lower()})
    elif adapter == "anthropic":
        if "content" in doc:
            messages.append({"role": "assistant", "parts": _parts(doc["content"]),
                             "finish_reason": doc.get("stop_reason") or ""})
    else:
        for choice in doc.get("choices") or ():
            message = choice.get("message") or {}
            text = message.get("content") if message else choice.get("text")
            messages.append({"role": "assistant", "parts": _parts(text),
                             "finish_reason": choice.get("finish_reason") or ""})
        for item in doc.get("output") or ():  # Responses API
            if isinstance(item, dict) and item.get("type") == "message":
                messages.append({"role": "assistant", "parts": _parts(item.get("content")),
                                 "finish_reason": doc.get("status") or ""})
    return orjson.dumps(messages).decode() if messages else None


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    parts = []
    for part in content or ():
        if isinstance(part, dict):
            kind = part.get("type", "")
            if kind in ("text", "input_text", "output_text"):
                parts.append({"type": "text", "content": part.get("text", "")})
            else:
                parts.append({"type": kind or "unknown"})
    return parts


def _gemini_parts(parts: Any) -> list[dict[str, Any]]:
    out = []
    for part in parts or ():
        if isinstance(part, dict):
            if "text" in part:
                out.append({"type": "text", "content": part["text"]})
            else:
                out.append({"type": next(iter(part), "unknown")})
    return out

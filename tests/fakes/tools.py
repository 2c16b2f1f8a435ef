"""The fakes' tool call (scenario token ``tool-call``): the answer calls the request's first tool
with fixed arguments, in each provider's documented shape (built by the provider modules)."""

from __future__ import annotations

import json
from typing import Any, Optional

TOOL_ARGS = {"city": "Paris", "days": 2}


def first_tool(body: Any) -> Optional[str]:
    """The name of the request's first tool: OpenAI `{type: function, function: {name}}`,
    Anthropic `{name, input_schema}`, Gemini `{functionDeclarations: [{name}]}`."""
    tools = body.get("tools") if isinstance(body, dict) else None
    if not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
        return None
    tool = tools[0]
    if isinstance(tool.get("function"), dict):
        return tool["function"].get("name")
    if isinstance(tool.get("functionDeclarations"), list) and tool["functionDeclarations"]:
        return tool["functionDeclarations"][0].get("name")
    return tool.get("name")


def argument_pieces() -> list[str]:
    """The arguments' JSON in two pieces, as streamed deltas carry them."""
    text = json.dumps(TOOL_ARGS)
    return [text[: len(text) // 2], text[len(text) // 2:]]

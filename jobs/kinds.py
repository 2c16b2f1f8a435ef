"""Which job module serves which upstream adapter: each::labs upstreams, Gemini (Veo), OpenAI (batches)."""
from __future__ import annotations

from types import ModuleType

from . import eachlabs, openai_batch, veo

BY_ADAPTER: dict[str, ModuleType] = {"eachlabs": eachlabs, "gemini": veo, "openai": openai_batch}
BY_KIND: dict[str, ModuleType] = {m.KIND: m for m in (eachlabs, veo, openai_batch)}

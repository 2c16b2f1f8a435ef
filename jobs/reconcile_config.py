"""The `reconcile:` config key: per provider, the admin key, base URL and the scope of the comparison."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

PROVIDERS = ("openai", "anthropic")
DEFAULT_BASE_URLS = {"openai": "https://api.openai.com", "anthropic": "https://api.anthropic.com"}
KEY_ENV = {"openai": "OPENAI_ADMIN_KEY", "anthropic": "ANTHROPIC_ADMIN_KEY"}
# provider-side filters, sent as query parameters; key_fingerprints filters the ledger side
_PROVIDER_FILTERS = {"openai": ("project_ids", "api_key_ids"), "anthropic": ("workspace_ids", "api_key_ids")}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ReconcileConfigError(ValueError):
    """A `reconcile:` value is wrong; the message names the key."""


@dataclass(slots=True)
class ProviderScope:
    provider: str
    admin_key: str | None = None  # from the config (after ${NAME} expansion) or the environment
    base_url: str = ""
    filters: dict[str, list[str]] = field(default_factory=dict)  # query parameter -> values
    key_fingerprints: list[str] = field(default_factory=list)  # ledger calls made with these keys only

    def __repr__(self) -> str:  # the admin key never shows, not even in a traceback
        return (f"ProviderScope(provider={self.provider!r}, base_url={self.base_url!r}, "
                f"filters={self.filters!r}, key_fingerprints={self.key_fingerprints!r})")


@dataclass(slots=True)
class ReconcileConfig:
    providers: dict[str, ProviderScope] = field(default_factory=dict)

    def scope(self, provider: str, environ: Mapping[str, str] | None = None) -> ProviderScope:
        """The provider's scope, defaults filled: its public base URL, the admin key from the environment."""
        env = os.environ if environ is None else environ
        scope = self.providers.get(provider) or ProviderScope(provider)
        if not scope.base_url:
            scope.base_url = DEFAULT_BASE_URLS[provider]
        if not scope.admin_key:
            scope.admin_key = env.get(KEY_ENV[provider]) or None
        return scope


def parse(doc: Any, environ: Mapping[str, str] | None = None) -> ReconcileConfig:
    """Parses the value of the `reconcile:` key (None: not configured)."""
    env = os.environ if environ is None else environ
    cfg = ReconcileConfig()
    if doc is None:
        return cfg
    if not isinstance(doc, dict):
        raise ReconcileConfigError("config key 'reconcile': expected a mapping of provider names (openai, anthropic)")
    for name, spec in doc.items():
        key = f"reconcile.{name}"
        if name not in PROVIDERS:
            raise ReconcileConfigError(f"config key {key!r}: unknown provider (known: {', '.join(PROVIDERS)})")
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            raise ReconcileConfigError(f"config key {key!r}: expected a mapping (admin_key, base_url, ...)")
        filters = _PROVIDER_FILTERS[name]
        known = {"admin_key", "base_url", "key_fingerprints", *filters}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ReconcileConfigError(f"config key '{key}.{unknown[0]}': unknown (known: {', '.join(sorted(known))})")
        scope = ProviderScope(name)
        if spec.get("admin_key") is not None:
            scope.admin_key = _expand(spec["admin_key"], f"{key}.admin_key", env)
        if spec.get("base_url") is not None:
            url = _expand(spec["base_url"], f"{key}.base_url", env).rstrip("/")
            if not url.startswith(("http://", "https://")):
                raise ReconcileConfigError(f"config key '{key}.base_url': expected an http(s) URL, got {url!r}")
            scope.base_url = url
        for f in filters:
            if f in spec:
                scope.filters[f] = _strings(spec[f], f"{key}.{f}")
        if "key_fingerprints" in spec:
            scope.key_fingerprints = _strings(spec["key_fingerprints"], f"{key}.key_fingerprints")
        cfg.providers[name] = scope
    return cfg


def _expand(value: Any, key: str, env: Mapping[str, str]) -> str:
    if not isinstance(value, str) or not value:
        raise ReconcileConfigError(f"config key {key!r}: expected a string such as ${{NAME}}")

    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in env:
            raise ReconcileConfigError(f"config key {key!r}: environment variable {m.group(1)} is not set")
        return env[m.group(1)]

    return _ENV_REF.sub(sub, value)


def _strings(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ReconcileConfigError(f"config key {key!r}: expected a list of strings")
    return list(value)

"""API keys and the tenants they name: ``shoal serve --keys PATH`` (YAML or JSON)::

    keys:
      - key: sk-team-a-...        # or key_env: TEAM_A_KEY (read from the environment)
        tenant: team-a
        weight: 1                 # its share under fair scheduling (kept for the scheduler)
        priority_ceiling: 0       # the best (lowest) priority its requests may ask for
        cache_group: shared       # optional: share prefix-cache blocks with the tenants of this group
        limits:                   # optional, each one optional: 429 with Retry-After beyond them
          requests_per_s: 5
          tokens_per_min: 60000   # prompt + max_tokens, the unused output given back at the end
          max_concurrent: 16      # sequences in flight
          max_queued: 8           # sequences admitted, no token yet

A request's key names its tenant (the ``user`` field then does not) and caps its ``priority``;
its prompts are cached under its tenant's salt, so no tenant can probe another's cached prompts
(by ``prefix_cache_hits`` or by TTFT) unless the keys file puts them in one ``cache_group``.
Keys are compared in constant time against every key, and never logged. Several keys may name one
tenant (they then share its limits); they must then agree on its weight, ceiling, group and limits.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from shoal.config_file import read_mapping

from shoal.engine.request import PRIORITY_MAX, PRIORITY_MIN
from shoal.server.quotas import LIMIT_FIELDS, TenantLimits

_FIELDS = {"key", "key_env", "tenant", "weight", "priority_ceiling", "cache_group", "limits"}


@dataclass(frozen=True)
class Tenant:
    name: str | None  # None: the single --api-key, whose requests name their tenant with `user`
    weight: float = 1.0
    priority_ceiling: int = PRIORITY_MIN
    cache_group: str | None = None  # tenants of one group share prefix-cache blocks (default: the tenant alone)
    limits: TenantLimits = TenantLimits()

    @property
    def cache_salt(self) -> str | None:
        """The prefix-cache salt of this tenant's requests (None for the single --api-key)."""
        return None if self.name is None else (self.cache_group or f"tenant:{self.name}")

    def cap(self, priority: int) -> int:
        """``priority``, no better than this tenant may ask for."""
        return max(priority, self.priority_ceiling)


class KeyRing:
    """The keys a server accepts, each naming its tenant."""

    def __init__(self, entries: list[tuple[str, Tenant]]) -> None:
        if not entries:
            raise ValueError("the keys file lists no keys")
        self._entries = [(f"Bearer {key}".encode(), tenant) for key, tenant in entries]

    @classmethod
    def single(cls, api_key: str) -> "KeyRing":
        return cls([(api_key, Tenant(None))])

    @classmethod
    def load(cls, path: str | os.PathLike) -> "KeyRing":
        """Read a keys file; ValueError naming the problem (never a key's value)."""
        p = Path(path)
        data = read_mapping(p)
        if not isinstance(data.get("keys"), list):
            raise ValueError(f"{p}: expected a mapping with a list under 'keys'")
        entries = []
        for i, item in enumerate(data["keys"]):
            where = f"{p}: keys[{i}]"
            if not isinstance(item, dict):
                raise ValueError(f"{where} is not a mapping")
            unknown = set(item) - _FIELDS
            if unknown:
                raise ValueError(f"{where}: unknown fields {sorted(unknown)} (known: {sorted(_FIELDS)})")
            key = os.environ.get(item["key_env"]) if "key_env" in item else item.get("key")
            if not isinstance(key, str) or len(key) < 8:
                raise ValueError(f"{where}: needs a key (or key_env naming a set variable) of at least 8 characters")
            name = item.get("tenant")
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: needs a tenant name")
            weight = item.get("weight", 1)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise ValueError(f"{where}: weight must be a number > 0")
            ceiling = item.get("priority_ceiling", PRIORITY_MIN)
            if isinstance(ceiling, bool) or not isinstance(ceiling, int) or not PRIORITY_MIN <= ceiling <= PRIORITY_MAX:
                raise ValueError(f"{where}: priority_ceiling must be an integer in [{PRIORITY_MIN}, {PRIORITY_MAX}]")
            group = item.get("cache_group")
            if group is not None and (not isinstance(group, str) or not group):
                raise ValueError(f"{where}: cache_group must be a non-empty string")
            limits = item.get("limits", {})
            if not isinstance(limits, dict) or set(limits) - set(LIMIT_FIELDS):
                raise ValueError(f"{where}: limits must be a mapping of {', '.join(LIMIT_FIELDS)}")
            try:
                limits = TenantLimits(**limits)
            except ValueError as exc:
                raise ValueError(f"{where}: limits: {exc}") from None
            entries.append((key, Tenant(name, float(weight), ceiling, None if group is None else f"group:{group}", limits)))
        if len({k for k, _ in entries}) != len(entries):
            raise ValueError(f"{p}: the same key is listed twice")
        by_name: dict[str, Tenant] = {}
        for _, tenant in entries:
            if by_name.setdefault(tenant.name, tenant) != tenant:
                raise ValueError(f"{p}: the keys of tenant {tenant.name!r} disagree on its weight, ceiling, group or limits")
        return cls(entries)

    def lookup(self, authorization: bytes) -> Tenant | None:
        """The tenant of an ``Authorization`` header value (scheme case-insensitive); None if no
        key matches. Every key is compared, in constant time."""
        scheme, _, token = authorization.partition(b" ")
        candidate = b"Bearer " + token.strip() if scheme.lower() == b"bearer" else b""
        found = None
        for expected, tenant in self._entries:
            if hmac.compare_digest(candidate, expected) and found is None:
                found = tenant
        return found

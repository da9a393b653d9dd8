"""API keys and quotas: who is calling, what they may see, and how much of this replica they may take.

One shared token let anyone holding it list and delete every user's voiceprints (biometric data) and
spend the whole fleet. So each client gets its own key, the voices a key registers belong to it, and
quotas bound what one key can take. This module is the pure core - the keys document parsed, a
presented key identified, quota arithmetic on plain data with the clock as an argument - plus the
small shell that reads the files and keeps this replica's counts; the HTTP side is request_context.py.

The keys document (VOXSCALE_API_KEYS: a YAML or JSON file, or a directory of them such as a mounted
Kubernetes Secret, whose files are merged) maps a key id to its entry::

    team-a:
      sha256: 5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8   # of the key
      requestsPerMinute: 120       # left out: no limit
      charactersPerDay: 200000     # of speech input, per UTC day
    ops:
      key: a-long-random-string    # the key itself: allowed, but a hash is better
      admin: true                  # sees, uses and deletes every key's voices

Why a hash: whoever can read the Secret (a backup, a too-wide RBAC rule, this pod's file system)
learns no key that calls the API. Plain sha256 without a salt is enough because keys are long random
strings, not passwords (`openssl rand -hex 32`; `printf %s "$KEY" | sha256sum` gives the hash). The key
id is what logs, metrics and voice records name; the key itself is never logged or stored.

Keys are read once, at start (a bad document fails the start, naming the file, key and field): after
changing the Secret, restart the pods (`kubectl rollout restart`).

The legacy VOXSCALE_API_TOKEN is the key `default`: an admin without quotas, so a deployment that sets
only the token keeps working as before. With neither set the server is open: every caller is
`anonymous`, an admin, and voices are registered without an owner, exactly as before keys existed.

Quotas are counted in fixed windows of UTC wall-clock time (the minute, the day) in this process's
memory: each replica counts on its own, so N replicas let a key make up to N times its quota, and a
restart forgets the counts. The replicas share no store fit for counters (the voice volume is a file
system; a read-modify-write counter on NFS needs locks it does not reliably give).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from voxscale.settings_contract import SettingError

KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # goes into logs, metric labels and voice records
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
DEFAULT_KEY_ID = "default"  # the legacy VOXSCALE_API_TOKEN
MIN_KEY_CHARS = 16  # a key given in clear must at least not be guessable
KEYS_SUFFIXES = (".yaml", ".yml", ".json")
ENV = "VOXSCALE_API_KEYS"


class KeysError(SettingError):
    """The keys document cannot be used; the message names the file, the key id, the field and the fix.

    A SettingError, so `voxscale serve` refuses to start with it (exit 2) instead of serving with
    fewer keys than the platform team wrote."""


class Quota(StrEnum):
    """A quota, named as its field in the keys document (and so in messages, headers and metrics)."""

    REQUESTS_PER_MINUTE = "requestsPerMinute"
    CHARACTERS_PER_DAY = "charactersPerDay"


WINDOW_S: dict[Quota, int] = {Quota.REQUESTS_PER_MINUTE: 60, Quota.CHARACTERS_PER_DAY: 86_400}
ENTRY_FIELDS = frozenset({"key", "sha256", "admin", *Quota})


@dataclass(frozen=True)
class ApiKey:
    """One client: its id, the sha256 of its key (never the key), whether it is an admin, its limits."""

    id: str
    digest: bytes = field(repr=False)
    admin: bool = False
    requests_per_minute: int | None = None
    characters_per_day: int | None = None

    def limit(self, quota: Quota) -> int | None:
        return self.requests_per_minute if quota is Quota.REQUESTS_PER_MINUTE else self.characters_per_day


# The caller of a server without keys: sees everything and registers voices without an owner.
ANONYMOUS = ApiKey("anonymous", b"", admin=True)


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


# ------------------------------------------------------------------------------ the keys document
def _limit(raw: Mapping[str, Any], quota: Quota, where: str) -> int | None:
    """A positive whole number, or None (no limit) when left out or null."""
    value = raw.get(quota.value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KeysError(
            f"{where}: {quota.value}: expected a whole number >= 1, got {value!r}; leave it out for no limit"
        )
    return value


def _digest(raw: Mapping[str, Any], where: str) -> bytes:
    """From `sha256` (hex of the key's sha256) or `key` (the key itself); exactly one of them."""
    if ("key" in raw) == ("sha256" in raw):
        raise KeysError(f"{where}: give exactly one of `sha256` (hex sha256 of the key, preferred) or `key`")
    if "sha256" in raw:
        hexdigest = str(raw["sha256"]).strip().lower()
        if not SHA256_HEX.fullmatch(hexdigest):
            raise KeysError(f'{where}: sha256: expected 64 hex digits (printf %s "$KEY" | sha256sum)')
        return bytes.fromhex(hexdigest)
    key = raw["key"]
    if not isinstance(key, str) or len(key) < MIN_KEY_CHARS:
        raise KeysError(f"{where}: key: use at least {MIN_KEY_CHARS} random characters (openssl rand -hex 32)")
    return key_digest(key)


def parse_entry(key_id: object, raw: object, source: str) -> ApiKey:
    """One key id and its entry, checked: an unknown field is a typo that would silently lift a limit."""
    if not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
        raise KeysError(
            f"{ENV}: {source}: key id {key_id!r}: use 1-63 letters, digits and ._- (it is written in logs and metrics)"
        )
    where = f"{ENV}: {source}: key {key_id!r}"
    if not isinstance(raw, Mapping):
        raise KeysError(f"{where}: expected a mapping with `sha256` or `key`, got {type(raw).__name__}")
    unknown = sorted(set(raw) - ENTRY_FIELDS)
    if unknown:
        raise KeysError(f"{where}: {unknown[0]}: unknown field; the fields are {', '.join(sorted(ENTRY_FIELDS))}")
    admin = raw.get("admin", False)
    if not isinstance(admin, bool):
        raise KeysError(f"{where}: admin: expected true or false, got {admin!r}")
    return ApiKey(
        key_id,
        _digest(raw, where),
        admin,
        _limit(raw, Quota.REQUESTS_PER_MINUTE, where),
        _limit(raw, Quota.CHARACTERS_PER_DAY, where),
    )


def parse_keys(doc: object, source: str) -> list[ApiKey]:
    """A parsed document (a mapping of key id to entry) as keys; an empty document has none."""
    if doc is None:
        return []
    if not isinstance(doc, Mapping):
        raise KeysError(f"{ENV}: {source}: expected a mapping of key id to entry, got {type(doc).__name__}")
    return [parse_entry(key_id, raw, source) for key_id, raw in doc.items()]


def merge(groups: Iterable[tuple[str, list[ApiKey]]]) -> tuple[ApiKey, ...]:
    """Keys from several sources; an id or a key given twice is refused (a request could not say who it is)."""
    seen_ids: dict[str, str] = {}
    seen_digests: dict[bytes, str] = {}
    keys: list[ApiKey] = []
    for source, group in groups:
        for key in group:
            if key.id in seen_ids:
                raise KeysError(f"{ENV}: key {key.id!r} is defined in {seen_ids[key.id]} and again in {source}")
            if key.digest in seen_digests:
                raise KeysError(
                    f"{ENV}: {source}: key {key.id!r} has the same key as {seen_digests[key.digest]!r}; "
                    "give each key id its own key"
                )
            seen_ids[key.id], seen_digests[key.digest] = source, key.id
            keys.append(key)
    return tuple(keys)


def legacy_key(token: str) -> ApiKey:
    """VOXSCALE_API_TOKEN as a key: id `default`, an admin (it could do everything before), no quotas."""
    return ApiKey(DEFAULT_KEY_ID, key_digest(token), admin=True)


# ------------------------------------------------------------------------------ who is calling
def bearer_key(authorization: str | None) -> str | None:
    """The key in `Authorization: Bearer <key>`; None when the header is absent, empty or another scheme."""
    scheme, _, key = (authorization or "").strip().partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


def identify(keys: Sequence[ApiKey], presented: str) -> ApiKey | None:
    """The key whose digest is the presented key's, or None.

    Every stored digest is compared, with hmac.compare_digest, and no comparison's result decides
    whether the next one runs: how long this takes depends on how many keys there are, never on how
    much of a key a guess got right. (Choosing the match afterwards tells a caller only which of the
    keys it already holds.) Digests, not keys, are compared, so the keys need not be in memory at all.
    """
    digest = key_digest(presented)
    matches = [hmac.compare_digest(key.digest, digest) for key in keys]
    return next((key for key, match in zip(keys, matches, strict=True) if match), None)


def may_see(caller: ApiKey, owner: str | None) -> bool:
    """Whether `caller` may list, use and delete a voice of `owner`.

    An admin sees every voice. A voice without an owner was registered before keys (or on a server
    without them): nobody can tell whose it is, so only admins see it, rather than everyone."""
    return caller.admin or (owner is not None and owner == caller.id)


# ------------------------------------------------------------------------------ quota arithmetic
@dataclass(frozen=True)
class Usage:
    """What a key spent of one quota in one window (`window`: the window's index since the epoch)."""

    window: int
    used: int


@dataclass(frozen=True)
class Verdict:
    """The outcome of a charge: allowed or not, the usage after it, and when its window resets.

    `never_fits`: the cost alone is over the limit, so waiting for the reset would not help."""

    allowed: bool
    usage: Usage
    resets_at: float  # epoch seconds
    never_fits: bool = False


def window_of(now: float, window_s: int) -> int:
    """Fixed windows aligned to the epoch: whole UTC minutes and UTC days (the epoch is a UTC midnight)."""
    return int(now // window_s)


def charge(usage: Usage | None, cost: int, limit: int, window_s: int, now: float) -> Verdict:
    """Spend `cost` against `limit` in the window `now` falls in, if it fits.

    A refused charge spends nothing. A clock stepped back (NTP) stays in the later window rather
    than reopening one already spent."""
    current = window_of(now, window_s)
    if usage is None or usage.window < current:
        usage = Usage(current, 0)
    resets_at = float((usage.window + 1) * window_s)
    if usage.used + cost > limit:
        return Verdict(False, usage, resets_at, never_fits=cost > limit)
    return Verdict(True, Usage(usage.window, usage.used + cost), resets_at)


def refund(usage: Usage, charged: Verdict, cost: int) -> Usage:
    """Give back a charge that was not used (the request was refused later), if its window is still current."""
    if not charged.allowed or usage.window != charged.usage.window:
        return usage
    return Usage(usage.window, max(0, usage.used - cost))


# ------------------------------------------------------------------------------ the shell
def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, without the snippet of the line PyYAML would quote: that line may hold a key."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "cannot parse"
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def _read_file(path: Path) -> list[ApiKey]:
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise KeysError(f"{ENV}: {path}: cannot read it ({exc.strerror or exc}); mount the keys Secret there") from None
    except yaml.YAMLError as exc:
        raise KeysError(f"{ENV}: {path}: not YAML or JSON ({_yaml_problem(exc)})") from None
    return parse_keys(doc, str(path))


def _files(path: Path) -> list[Path]:
    """The keys files: `path` itself, or the *.yaml/*.yml/*.json in a directory.

    Names starting with a dot are skipped: a mounted Secret keeps its real files in `..data` and
    timestamped `..2024_...` directories and shows each item as a link beside them."""
    if not path.is_dir():
        return [path]
    found = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.suffix in KEYS_SUFFIXES)
    if not found:
        raise KeysError(
            f"{ENV}: {path}: a directory without keys files; put the keys in a Secret item named e.g. keys.yaml"
        )
    return found


def load_keys(path: str | None, token: str | None) -> tuple[ApiKey, ...]:
    """The keys this server accepts: the file or directory at `path`, and the legacy token as `default`.

    None of either: no keys, an open server. Keys configured but none defined is refused: every request
    would get 401, which is never what was meant."""
    groups: list[tuple[str, list[ApiKey]]] = []
    if path:
        groups += [(str(f), _read_file(f)) for f in _files(Path(path))]
        if not any(keys for _, keys in groups):
            raise KeysError(f"{ENV}: {path}: defines no keys; add one (see inference/tenants.py) or unset {ENV}")
    if token:
        groups.append(("VOXSCALE_API_TOKEN", [legacy_key(token)]))
    return merge(groups)


class Ledger:
    """This replica's quota usage per key, under a lock; `clock` is wall-clock epoch seconds (UTC windows).

    Bounded by the number of keys times two quotas: one Usage each."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._usage: dict[tuple[str, Quota], Usage] = {}
        self._lock = threading.Lock()

    def charge(self, key: ApiKey, quota: Quota, cost: int) -> Verdict | None:
        """The verdict on spending `cost`; None when the key has no such limit (nothing is counted)."""
        limit = key.limit(quota)
        if limit is None:
            return None
        with self._lock:
            verdict = charge(self._usage.get((key.id, quota)), cost, limit, WINDOW_S[quota], self.clock())
            self._usage[(key.id, quota)] = verdict.usage
        return verdict

    def refund(self, key: ApiKey, quota: Quota, charged: Verdict, cost: int) -> None:
        with self._lock:
            usage = self._usage.get((key.id, quota))
            if usage is not None:
                self._usage[(key.id, quota)] = refund(usage, charged, cost)

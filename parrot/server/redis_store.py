"""The Redis :class:`~parrot.dataflow.store.StateStore`: state that survives a restart.

Selected by the service when ``PARROT_REDIS_URL`` is set; build one with
``RedisStore.from_url(url, prefix="parrot")`` and ``await store.close()`` it.

Key layout (``P`` is the prefix, ``KIND`` one of :data:`~parrot.dataflow.store.KINDS`):

``P:KIND``        hash, field = record id, value = the record as JSON
``P:KIND:order``  sorted set, member = record id, score = its insertion number
``P:seq``         string, the last insertion number handed out (all kinds)

:meth:`RedisStore.write` is one optimistic transaction: ``WATCH P:seq``, read
which ids of the batch are new (``ZMSCORE``) and the counter, then
``MULTI`` / ``HSET`` every record / ``ZADD NX`` the new ids with the next
numbers / ``SET P:seq`` / ``EXEC``. The batch lands whole or not at all; if
another writer inserted anything meanwhile, ``EXEC`` is refused and the write
is retried, so insertion numbers follow the order in which batches land.
Replacing a record keeps its number (hence its place in :meth:`load`).

:meth:`RedisStore.set_value` is one Lua script (atomic on the server): it
decodes the variable's record with ``cjson``, refuses (0) when the record is
missing or its ``value`` is not null, else writes the record back with the
value (1). Redis' ``cjson`` turns empty arrays into ``{}`` and keeps 14
significant digits of numbers, so :meth:`write` refuses variable records that
would not survive that round trip instead of letting ``set_value`` corrupt them.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from parrot.dataflow.store import KINDS, Record, StateStore, StoreUnavailableError, Write

log = logging.getLogger(__name__)

__all__ = ["RedisStore", "StoreUnavailableError", "redact_url"]

#: How often a write is retried when other writers keep inserting under it.
MAX_WRITE_ATTEMPTS = 1000

_SET_VALUE_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then
  return 0
end
local ok, record = pcall(cjson.decode, raw)
if not ok or type(record) ~= 'table' then
  return redis.error_reply('variable record ' .. ARGV[1] .. ' is not a JSON object')
end
local current = record['value']
if current ~= nil and current ~= cjson.null then
  return 0
end
record['value'] = ARGV[2]
local encoded = cjson.encode(record)
redis.call('HSET', KEYS[1], ARGV[1], encoded)
return 1
"""


def redact_url(url: str) -> str:
    """``url`` with its password (userinfo or ``?password=``) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user, has_password, _ = userinfo.partition(":")
            netloc = f"{user}:***@{host}" if has_password else f"{user}@{host}"
        query = parts.query
        if query:
            pairs = [(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(query, keep_blank_values=True)]
            query = urlencode(pairs, safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparsable Redis URL>"


def _cjson_safe(value: Any, where: str) -> None:
    """Raise ValueError if Redis' cjson would not re-encode ``value`` unchanged."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if abs(value) >= 10**14:
            raise ValueError(f"{where}: integer {value} has more than 14 digits (the Redis store's set_value would round it)")
        return
    if isinstance(value, float):
        if not math.isfinite(value) or float(f"{value:.14g}") != value:
            raise ValueError(f"{where}: number {value!r} does not survive 14 significant digits (the Redis store's set_value)")
        return
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{where}: empty arrays become objects in the Redis store's set_value; use null or omit it")
        for i, item in enumerate(value):
            _cjson_safe(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _cjson_safe(item, f"{where}.{key}")
        return
    # Anything else fails json.dumps with a TypeError of its own.


class RedisStore(StateStore):
    """Sessions, variables, calls (and the service's tenants, keys, functions) in Redis."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "parrot", url: str = "redis") -> None:
        if not prefix or not isinstance(prefix, str):
            raise ValueError("prefix must be a non-empty string")
        self.client = client
        self.prefix = prefix
        self.url = redact_url(url)
        self._set_value_script = client.register_script(_SET_VALUE_LUA)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "parrot", **kwargs: Any) -> "RedisStore":
        """A store on the Redis at ``url`` (``redis://[:password@]host:port/db``,
        ``rediss://`` or ``unix://``). ``kwargs`` go to ``redis.asyncio.from_url``.
        Connecting is lazy: the first operation reports an unreachable server."""
        kwargs.setdefault("decode_responses", True)
        kwargs.setdefault("socket_connect_timeout", 5)
        kwargs.setdefault("socket_timeout", 30)
        # A couple of quick retries (a pooled connection may be stale after a
        # Redis restart), not redis-py's default of seconds of backoff.
        kwargs.setdefault("retry", Retry(ExponentialBackoff(cap=0.5, base=0.05), 2))
        if not kwargs["decode_responses"]:
            raise ValueError("RedisStore needs decode_responses=True")
        try:
            client = aioredis.from_url(url, **kwargs)
        except ValueError as exc:
            raise ValueError(f"invalid Redis URL {redact_url(url)!r}: {exc}") from None
        return cls(client, prefix=prefix, url=url)

    # -- keys -------------------------------------------------------------
    def records_key(self, kind: str) -> str:
        return f"{self.prefix}:{kind}"

    def order_key(self, kind: str) -> str:
        return f"{self.prefix}:{kind}:order"

    @property
    def seq_key(self) -> str:
        return f"{self.prefix}:seq"

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind!r} (known: {', '.join(KINDS)})")

    @asynccontextmanager
    async def _reachable(self, doing: str) -> AsyncIterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailableError(
                self.url, f"Redis state store at {self.url} is unavailable ({doing}): {exc}"
            ) from exc

    # -- StateStore -------------------------------------------------------
    async def ping(self) -> None:
        """Raise :class:`StoreUnavailableError` unless the server answers."""
        async with self._reachable("ping"):
            await self.client.ping()

    async def write(self, records: Iterable[Write]) -> None:
        # Everything that can be wrong with the batch is found before Redis is touched.
        by_kind: dict[str, dict[str, str]] = {}
        first_seen: list[tuple[str, str]] = []
        for kind, record_id, record in list(records):
            self._check_kind(kind)
            if not isinstance(record_id, str) or not record_id:
                raise ValueError(f"{kind} record id must be a non-empty string, got {record_id!r}")
            if not isinstance(record, dict):
                raise ValueError(f"{kind} {record_id}: a record is a dict, got {type(record).__name__}")
            if kind == "variable":
                _cjson_safe(record, f"variable {record_id}")
                value = record.get("value")
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"variable {record_id}: value must be a string or None")
            try:
                encoded = json.dumps(record, separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{kind} {record_id}: record is not JSON-able: {exc}") from None
            kind_records = by_kind.setdefault(kind, {})
            if record_id not in kind_records:
                first_seen.append((kind, record_id))
            kind_records[record_id] = encoded  # a later duplicate in the batch wins, as in MemoryStore
        if not by_kind:
            return
        async with self._reachable("write"):
            async with self.client.pipeline(transaction=True) as pipe:
                lost_connections = 0
                for _ in range(MAX_WRITE_ATTEMPTS):
                    try:
                        await pipe.watch(self.seq_key)
                        known: set[tuple[str, str]] = set()
                        for kind, kind_records in by_kind.items():
                            ids = list(kind_records)
                            scores = await pipe.zmscore(self.order_key(kind), ids)
                            known.update((kind, i) for i, s in zip(ids, scores) if s is not None)
                        seq = int(await pipe.get(self.seq_key) or 0)
                        new = [key for key in first_seen if key not in known]
                        pipe.multi()
                        for kind, kind_records in by_kind.items():
                            pipe.hset(self.records_key(kind), mapping=kind_records)
                        for n, (kind, record_id) in enumerate(new, start=seq + 1):
                            pipe.zadd(self.order_key(kind), {record_id: n}, nx=True)
                        if new:
                            pipe.set(self.seq_key, seq + len(new))
                        await pipe.execute()
                        return
                    except WatchError as exc:
                        # redis-py reports a connection lost while watching as a
                        # WatchError too; retry that (a stale pooled connection)
                        # only a few times, and a real race with other writers
                        # (someone inserted meanwhile) until it goes through.
                        cause = exc.__context__
                        if isinstance(cause, (RedisConnectionError, RedisTimeoutError, OSError)):
                            lost_connections += 1
                            if lost_connections > 2:
                                raise cause from None
                        continue
                    finally:
                        await pipe.reset()
        raise StoreUnavailableError(
            self.url, f"Redis state store at {self.url}: a write lost {MAX_WRITE_ATTEMPTS} races to other writers"
        )

    async def set_value(self, var_id: str, value: str) -> bool:
        if not isinstance(value, str):
            raise ValueError(f"variable {var_id}: value must be a string, got {type(value).__name__}")
        async with self._reachable("set_value"):
            done = await self._set_value_script(keys=[self.records_key("variable")], args=[var_id, value])
        return int(done) == 1

    async def delete(self, keys: Iterable[tuple[str, str]]) -> None:
        by_kind: dict[str, list[str]] = {}
        for kind, record_id in keys:
            self._check_kind(kind)
            by_kind.setdefault(kind, []).append(record_id)
        if not by_kind:
            return
        async with self._reachable("delete"):
            async with self.client.pipeline(transaction=True) as pipe:  # MULTI/EXEC: all or none
                for kind, ids in by_kind.items():
                    pipe.hdel(self.records_key(kind), *ids)
                    pipe.zrem(self.order_key(kind), *ids)
                await pipe.execute()

    async def load(self, kind: str) -> list[Record]:
        self._check_kind(kind)
        async with self._reachable("load"):
            async with self.client.pipeline(transaction=True) as pipe:  # one consistent snapshot
                pipe.zrange(self.order_key(kind), 0, -1)
                pipe.hgetall(self.records_key(kind))
                order, records = await pipe.execute()
        out: list[Record] = []
        for record_id in order:
            if record_id not in records:
                continue
            try:
                record = json.loads(records[record_id])
            except ValueError:
                record = None
            if not isinstance(record, dict):
                # A damaged record must not stop the service starting: skip it, leave it for a person.
                log.error("redis: skipped the unreadable %s record %r", kind, record_id)
                continue
            out.append(record)
        return out

    async def close(self) -> None:
        await self.client.aclose()

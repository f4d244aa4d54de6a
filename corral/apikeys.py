"""``corral keys``: API keys and their classes, stored in Redis (``corral.tenants``).

``add`` prints a new key once (only its digest is stored: a lost key is revoked and
replaced, never recovered); ``list`` never shows one. Gateways see a new key at once and
a change or revocation within ``CORRAL_AUTH_CACHE_TTL`` seconds. Every change is written
to the audit log when ``CORRAL_AUDIT_LOG`` names one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from dataclasses import asdict, replace
from typing import Any

from redis import Redis

from corral import keys
from corral.audit import AuditLog
from corral.connections import text
from corral.names import normalize_model
from corral.settings import ActionParser, CommonSettings
from corral.tenants import (
    ApiKey,
    KeyClass,
    digest,
    new_token,
    parse_scopes,
)

_CLASS_LIMITS = (
    ("priority_ceiling", "the most urgent priority its keys may ask for (0-9; 0: any)"),
    ("num_predict_max", "the most tokens one generation may ask for (0: no ceiling)"),
    ("quota_bytes", "request bytes each key may keep stored in wait=false jobs (0: no quota)"),
    ("key_rpm", "requests per minute per key (0: no limit)"),
    ("key_tpm", "tokens per minute per key (0: no limit)"),
    ("class_rpm", "requests per minute, the whole class (0: no limit)"),
    ("class_tpm", "tokens per minute, the whole class (0: no limit)"),
)


def build_parser() -> argparse.ArgumentParser:
    command = ActionParser("corral keys", __doc__)

    add = command.action("add", help="create a key and print it (once)")
    add.add_argument("--id", default="", help="a name for the key (default: random)")
    _key_options(add, scopes_default="user")

    listing = command.action("list", help="show keys (never the keys)")
    listing.add_argument("--json", action="store_true")

    revoke = command.action("revoke", help="delete keys for good")
    revoke.add_argument("ids", nargs="+")

    change = command.action("set", help="change a key's class, scopes, priority")
    change.add_argument("id")
    _key_options(change, scopes_default=None)

    klass = command.action("class", help="create or change a class")
    klass.add_argument("name")
    klass.add_argument("--models", default=None, help="comma-separated models (''=every one)")
    for name, text_ in _CLASS_LIMITS:
        klass.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=text_)

    classes = command.action("classes", help="show the classes")
    classes.add_argument("--json", action="store_true")

    drop = command.action("class-delete", help="delete a class")
    drop.add_argument("name")
    return command.parser


def _key_options(parser: argparse.ArgumentParser, *, scopes_default: str | None) -> None:
    parser.add_argument("--class", dest="key_class", default=None, help="its class's name")
    parser.add_argument(
        "--scopes",
        default=scopes_default,
        help="comma-separated: user, metrics, admin (default: user)",
    )
    parser.add_argument(
        "--priority", type=int, default=None, help="priority when a request names none (0-9)"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = CommonSettings.build(
        **({"redis_url": args.redis_url} if args.redis_url else {})
    ).redis_url
    redis = Redis.from_url(url)
    target = os.environ.get("CORRAL_AUDIT_LOG", "")
    audit = AuditLog(target) if target else None
    try:
        return _run(redis, args, audit)
    except ValueError as exc:
        print(f"corral keys: {exc}", file=sys.stderr)
        return 2
    finally:
        redis.close()
        if audit is not None:
            audit.close()


def _run(redis: Redis, args: argparse.Namespace, audit: AuditLog | None) -> int:
    action = args.action
    if action == "list":
        return _list(redis, args.json)
    if action == "classes":
        return _classes(redis, args.json)
    if action == "add":
        key_id = args.id or uuid.uuid4().hex[:12]
        if redis.hexists(keys.API_KEY_IDS, key_id):
            raise ValueError(f"a key with id {key_id!r} exists")
        _check_class(redis, args.key_class)
        key = ApiKey(
            id=key_id,
            key_class=args.key_class or "",
            scopes=parse_scopes(args.scopes),
            priority=_priority(args.priority),
            created=time.time(),
        )
        token = new_token()
        hashed = digest(token)
        with redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.API_KEYS, hashed, key.to_json())
            pipe.hset(keys.API_KEY_IDS, key_id, hashed)
            pipe.execute()
        _audit(audit, "key-add", key=key_id, **{"class": key.key_class})
        print(f"id:  {key_id}\nkey: {token}\n(shown once: store it now)")
        return 0
    if action == "revoke":
        for key_id in args.ids:
            stored = redis.hget(keys.API_KEY_IDS, key_id)
            if stored is None:
                raise ValueError(f"no key with id {key_id!r}")
            with redis.pipeline(transaction=True) as pipe:
                pipe.hdel(keys.API_KEYS, stored)
                pipe.hdel(keys.API_KEY_IDS, key_id)
                pipe.execute()
            _audit(audit, "key-revoke", key=key_id)
            print(f"revoked {key_id}")
        return 0
    if action == "set":
        stored = redis.hget(keys.API_KEY_IDS, args.id)
        raw = redis.hget(keys.API_KEYS, stored) if stored else None
        if stored is None or raw is None:
            raise ValueError(f"no key with id {args.id!r}")
        key = ApiKey.from_json(raw)
        if args.key_class is not None:
            _check_class(redis, args.key_class)
            key = replace(key, key_class=args.key_class)
        if args.scopes is not None:
            key = replace(key, scopes=parse_scopes(args.scopes))
        if args.priority is not None:
            key = replace(key, priority=_priority(args.priority))
        redis.hset(keys.API_KEYS, stored, key.to_json())
        _audit(audit, "key-set", key=key.id, **{"class": key.key_class})
        print(f"updated {key.id}")
        return 0
    if action == "class":
        raw = redis.hget(keys.KEY_CLASSES, args.name)
        klass = KeyClass.from_json(raw) if raw else KeyClass(args.name)
        changes: dict[str, Any] = {
            name: getattr(args, name)
            for name, _ in _CLASS_LIMITS
            if getattr(args, name) is not None
        }
        if args.models is not None:
            models = [m.strip() for m in args.models.split(",") if m.strip()]
            changes["models"] = tuple(normalize_model(m) for m in models)
        klass = replace(klass, **changes)
        redis.hset(keys.KEY_CLASSES, klass.name, klass.to_json())
        _audit(audit, "class-set", **{"class": klass.name})
        print(json.dumps(asdict(klass)))
        return 0
    if action == "class-delete":
        if not redis.hdel(keys.KEY_CLASSES, args.name):
            raise ValueError(f"no class {args.name!r}")
        _audit(audit, "class-delete", **{"class": args.name})
        print(f"deleted class {args.name} (its keys are refused until it exists again)")
        return 0
    raise AssertionError(action)


def _priority(value: int | None) -> int | None:
    if value is not None and not 0 <= value <= 9:
        raise ValueError("--priority must be 0-9")
    return value


def _check_class(redis: Redis, name: str | None) -> None:
    if name and not redis.hexists(keys.KEY_CLASSES, name):
        raise ValueError(f"no class {name!r}: create it first with `corral keys class {name}`")


def _audit(audit: AuditLog | None, action: str, **fields: Any) -> None:
    if audit is not None:
        audit.write({"admin": action, "by": "corral keys", **fields})


def _list(redis: Redis, as_json: bool) -> int:
    found = sorted(
        (ApiKey.from_json(raw) for raw in redis.hvals(keys.API_KEYS)), key=lambda k: k.created
    )
    rows = [
        {
            "id": k.id,
            "class": k.key_class,
            "scopes": ",".join(sorted(k.scopes)),
            "priority": k.priority,
            "created": time.strftime("%Y-%m-%d %H:%M", time.gmtime(k.created)),
        }
        for k in found
    ]
    if as_json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no keys stored (the gateway is open unless CORRAL_API_KEYS holds some)")
        return 0
    print(f"{'ID':<14} {'CLASS':<12} {'SCOPES':<20} {'PRIO':<5} CREATED (UTC)")
    for row in rows:
        prio = "-" if row["priority"] is None else str(row["priority"])
        print(
            f"{row['id']:<14} {row['class'] or '-':<12} {row['scopes']:<20} {prio:<5} "
            f"{row['created']}"
        )
    return 0


def _classes(redis: Redis, as_json: bool) -> int:
    found = [
        asdict(KeyClass.from_json(raw))
        for _, raw in sorted(redis.hgetall(keys.KEY_CLASSES).items(), key=lambda kv: text(kv[0]))
    ]
    if as_json:
        print(json.dumps(found))
        return 0
    for klass in found:
        print(json.dumps(klass))
    if not found:
        print("no classes")
    return 0

"""Building `routes[i]` (and the route keys of `defaults:`): match, service, timeout,
retries with back-off and budget, fallback and fault injection.

As for services, every block goes through `Reader.block`: the keys are the model's fields,
and a key left out takes the model's default. `retry_on` fills two fields: the HTTP and
connection conditions (`retry_on`) and the gRPC ones, by status code (`retry_on_grpc`).
"""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.config.addresses import is_ip, valid_hostname
from sidecar.config.durations import format_duration
from sidecar.config.model import (
    RETRY_CONDITIONS,
    RETRY_GRPC_CONDITIONS,
    BackoffConfig,
    BudgetConfig,
    FallbackConfig,
    FaultAbort,
    FaultConfig,
    FaultDelay,
    MatchConfig,
    RetryConfig,
    RouteConfig,
)
from sidecar.config.reader import BAD, TOKEN, Read, Reader, suggest
from sidecar.config.schema import keys, own
from sidecar.config.show import clip, quote
from sidecar.config.yamlsafe import YMap, YNode, join

RETRY_SHORTHANDS: dict[str, frozenset[int]] = {
    "5xx": frozenset(range(500, 600)),
    "gateway-error": frozenset({502, 503, 504}),
}
# Responses the sidecar sends itself must be final ones: a 1xx cannot end an exchange.
MIN_RESPONSE_STATUS = 200

Headers = tuple[tuple[str, str], ...]


def settings_readers(r: Reader, eff: str) -> dict[str, Read]:
    """The readers of the route keys that `defaults:` may set too."""
    return {
        "timeout": r.duration,
        "retries": lambda n: retries(r, n, f"{eff}.retries"),
        "fallback": lambda n: fallback(r, n, f"{eff}.fallback"),
        "fault": lambda n: fault(r, n, f"{eff}.fault"),
    }


def check_defaults(r: Reader, m: YMap) -> None:
    """The route keys of `defaults:`, read on their own so a mistake shows even when no
    route inherits it."""
    r.block(m, "defaults", RouteConfig, settings_readers(r, "defaults"), handled=own(RouteConfig))


def route(r: Reader, name: str, m: YMap, eff: str, services: Sequence[str]) -> RouteConfig | None:
    def service_ref(n: YNode) -> str | None:
        value = r.string(n)
        if value is None or value in services:
            return value
        close = suggest(value, services)
        if close:
            hint = f" (did you mean {quote(close)}?)"
        elif services:
            hint = " (defined: " + ", ".join(clip(s) for s in services) + ")"
        else:
            hint = " (no services are defined)"
        r.error(n, f"unknown service {quote(value)}{hint}")
        return None

    match_config = r.required(m, "match", eff, lambda n: match(r, n, f"{eff}.match"))
    service = r.required(m, "service", eff, service_ref)
    settings = r.block(
        m,
        eff,
        RouteConfig,
        {"rewrite_prefix": r.slash_path, **settings_readers(r, eff)},
        handled=("name", "match", "service"),
    )
    if match_config is None or service is None:
        return None
    return RouteConfig(name=name, match=match_config, service=service, **settings)


def match(r: Reader, node: YNode, eff: str) -> MatchConfig | None:
    m = r.mapping(node, keys(MatchConfig))
    if m is None:
        return None
    has_prefix, has_path = "prefix" in m.entries, "path" in m.entries
    if has_prefix and has_path:
        entry = m.entries["path"]
        r.report(entry.key_pos, entry.owner, "give either 'prefix' or 'path', not both")
        return None
    if not has_prefix and not has_path:
        r.error(m, "needs 'prefix' (matches the path and below) or 'path' (exact)")
        return None
    key = "prefix" if has_prefix else "path"
    child = r.child(m, key, eff)
    assert child is not None
    where = r.http_path(child)

    def method(n: YNode) -> str | None:
        value = r.string(n)
        if value is not None and TOKEN.fullmatch(value) is None:
            r.error(n, f"{quote(value)} is not a valid HTTP method")
            return None
        return None if value is None else value.upper()

    def methods(n: YNode) -> frozenset[str] | None:
        values = r.items(n, method)
        if values == []:
            r.error(n, "must not be empty (leave 'methods' out to match every method)")
            return None
        return None if values is None else frozenset(values)

    def host(n: YNode) -> str | None:
        value = r.nonempty(n)
        if value is None:
            return None
        if ":" in value and not value.startswith("["):
            r.error(n, f"must be a host name without port, got {quote(value)}")
            return None
        if not valid_hostname(value) and not (
            value.startswith("[") and value.endswith("]") and is_ip(value[1:-1])
        ):
            r.error(n, f"{quote(value)} is not a valid host name")
            return None
        return value.lower().rstrip(".")

    settings = r.block(
        m,
        eff,
        MatchConfig,
        {"methods": methods, "headers": lambda n: headers(r, n, f"{eff}.headers"), "host": host},
        handled=("prefix", "path"),
    )
    if where is None:
        return None
    if has_prefix:
        return MatchConfig(prefix=where, **settings)
    return MatchConfig(path=where, **settings)


def headers(r: Reader, node: YNode, eff: str) -> Headers | None:
    """Header name -> value pairs, names lower-cased (and so, once each)."""
    m = r.mapping(node)
    if m is None:
        return None
    out: dict[str, str] = {}
    ok = True
    for key, entry in m.entries.items():
        name = key.lower()
        if TOKEN.fullmatch(key) is None:
            r.report(entry.key_pos, entry.owner, f"{quote(key)} is not a valid header name")
            ok = False
            continue
        if name in out:
            r.report(entry.key_pos, entry.owner, f"header {quote(name)} is given twice")
            ok = False
            continue
        value = r.string(entry.value, lenient=True)
        if value is None:
            ok = False
            continue
        if "\r" in value or "\n" in value:
            r.error(entry.value, "header values must not contain line breaks")
            ok = False
            continue
        r.note(join(eff, name), entry.value)
        out[name] = value
    return tuple(out.items()) if ok else None


def retries(r: Reader, node: YNode, eff: str) -> RetryConfig | None:
    m = r.mapping(node, keys(RetryConfig))
    if m is None:
        return None
    names = [*RETRY_CONDITIONS, *RETRY_GRPC_CONDITIONS, *RETRY_SHORTHANDS]

    def condition(n: YNode) -> tuple[frozenset[str | int], frozenset[int]] | None:
        value = r.value(n)
        if isinstance(value, int) and not isinstance(value, bool):
            status = r.status(n)
            return None if status is None else (frozenset({status}), frozenset())
        if isinstance(value, str):
            if value in RETRY_CONDITIONS:
                return frozenset({value}), frozenset()
            if value in RETRY_GRPC_CONDITIONS:
                return frozenset(), frozenset({RETRY_GRPC_CONDITIONS[value]})
            if value.lower() in RETRY_SHORTHANDS:
                return frozenset(RETRY_SHORTHANDS[value.lower()]), frozenset()
            close = suggest(value, names)
            hint = (
                f"did you mean '{close}'?"
                if close
                else "valid: " + ", ".join(names) + ", or a status"
            )
            r.error(n, f"unknown retry condition {quote(value)} ({hint})")
            return None
        if value is not BAD:
            r.expected(n, "a retry condition or an HTTP status", value)
        return None

    def conditions(n: YNode) -> tuple[frozenset[str | int], frozenset[int]] | None:
        pairs = r.items(n, condition)
        if pairs is None:
            return None
        http: frozenset[str | int] = frozenset().union(*(p[0] for p in pairs))
        grpc: frozenset[int] = frozenset().union(*(p[1] for p in pairs))
        return http, grpc

    settings = r.block(
        m,
        eff,
        RetryConfig,
        {
            "max_retries": lambda n: r.integer(n, lo=0),
            "per_try_timeout": r.duration,
            "retry_on": conditions,
            "backoff": lambda n: backoff(r, n, f"{eff}.backoff"),
            "budget": lambda n: budget(r, n, f"{eff}.budget"),
            "non_idempotent": r.boolean,
            "max_body_bytes": lambda n: r.integer(n, lo=0),
        },
    )
    if "retry_on" in settings:
        settings["retry_on"], settings["retry_on_grpc"] = settings["retry_on"]
    return RetryConfig(**settings)


def backoff(r: Reader, node: YNode, eff: str) -> BackoffConfig | None:
    m = r.mapping(node, keys(BackoffConfig))
    if m is None:
        return None
    config = BackoffConfig(
        **r.block(m, eff, BackoffConfig, {"base": r.duration, "max": r.duration})
    )
    if config.base > config.max:
        r.error(
            r.spot(f"{eff}.base" if "base" in m.entries else f"{eff}.max"),
            f"base ({format_duration(config.base)}) must not be larger than "
            f"max ({format_duration(config.max)})",
        )
        return None
    return config


def budget(r: Reader, node: YNode, eff: str) -> BudgetConfig | None:
    m = r.mapping(node, keys(BudgetConfig))
    if m is None:
        return None
    settings = r.block(
        m,
        eff,
        BudgetConfig,
        {"ratio": lambda n: r.number(n, lo=0), "min_per_second": lambda n: r.number(n, lo=0)},
    )
    return BudgetConfig(**settings)


def fallback(r: Reader, node: YNode, eff: str) -> FallbackConfig | None:
    m = r.mapping(node, keys(FallbackConfig))
    if m is None:
        return None

    def body(n: YNode) -> bytes | None:
        value = r.string(n, lenient=True, hint=" (quote a JSON body: body: '{\"items\": []}')")
        return None if value is None else value.encode()

    settings = r.block(
        m,
        eff,
        FallbackConfig,
        {
            "status": lambda n: r.status(n, MIN_RESPONSE_STATUS),
            "headers": lambda n: headers(r, n, f"{eff}.headers"),
            "body": body,
        },
    )
    return FallbackConfig(**settings)


def fault(r: Reader, node: YNode, eff: str) -> FaultConfig | None:
    m = r.mapping(node, keys(FaultConfig))
    if m is None:
        return None

    def percent(n: YNode) -> float | None:
        return r.number(n, lo=0, hi=100)

    def delay(n: YNode) -> FaultDelay | None:
        dm = r.mapping(n, keys(FaultDelay))
        if dm is None:
            return None
        p = r.required(dm, "percent", f"{eff}.delay", percent)
        d = r.required(dm, "duration", f"{eff}.delay", r.duration)
        return None if p is None or d is None else FaultDelay(p, d)

    def abort(n: YNode) -> FaultAbort | None:
        am = r.mapping(n, keys(FaultAbort))
        if am is None:
            return None
        before = r.errors
        p = r.required(am, "percent", f"{eff}.abort", percent)
        settings = r.block(
            am,
            f"{eff}.abort",
            FaultAbort,
            {"status": lambda x: r.status(x, MIN_RESPONSE_STATUS), "grpc_status": r.grpc_status},
            handled=("percent",),
        )
        written = [
            k
            for k in ("status", "grpc_status")
            if (v := am.get(k)) is not None and not r.is_null(v)
        ]
        if not written:
            r.error(
                am,
                "needs 'status' (the answer to HTTP requests) or 'grpc_status' (to gRPC "
                "requests), or both",
            )
            return None
        if p is None or r.errors > before:
            return None
        return FaultAbort(percent=p, **settings)

    if not any(k in m.entries for k in ("delay", "abort")):
        r.error(m, "needs 'delay' or 'abort' (or leave 'fault' out)")
        return None
    return FaultConfig(**r.block(m, eff, FaultConfig, {"delay": delay, "abort": abort}))

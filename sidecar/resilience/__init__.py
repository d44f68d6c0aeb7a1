"""Resilience building blocks the attempt loop composes, one concern per module.

- `breaker`: the per-service circuit breaker: the consecutive, failure-rate and slow-call
  rules, growing open periods and gated half-open trials, with pybreaker as the state
  machine and its transitions mirrored into metrics and logs.
- `window`: the sliding, bucketed time window the breaker and the budget count in.
- `budget`: the per-route retry budget: a ratio ceiling and a failure-aware throttle.
- `retry`: which outcomes are retried, for which methods, after how long.
- `backoff`: the pure back-off function (exponential, full jitter) and `Retry-After`
  parsing.
- `fault`: per-route fault injection (delays and aborts drawn by percentage).

Nothing here does I/O, sleeps or starts tasks: each piece answers a synchronous question on
the event loop ("may this attempt go?", "may we retry?", "how long to wait?"), and the
attempt loop (`sidecar.attempts`) and the breaker's recovery task
(`sidecar.cluster.recovery`) do the waiting. docs/resilience.md describes how they compose.
"""

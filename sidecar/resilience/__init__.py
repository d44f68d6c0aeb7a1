"""Resilience building blocks the proxy's retry loop composes, one concern per module.

- `breaker`: the per-service circuit breaker, an asyncio adapter over pybreaker (admission,
  half-open trial slots, cancellation, state mirrored into metrics and logs).
- `budget`: the per-route retry budget, a sliding window of requests and retries.
- `backoff`: the pure back-off function (exponential, full jitter) and `Retry-After` parsing
  and formatting.
- `fault`: per-route fault injection (delays and aborts drawn by percentage).

Nothing here does I/O, sleeps or starts tasks: each piece answers a synchronous question on
the event loop ("may this attempt go?", "may we retry?", "how long to wait?"), and the retry
loop does the waiting. docs/resilience.md describes how they compose.
"""

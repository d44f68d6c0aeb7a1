"""The sidecar's benchmark: throughput, latency, cost and resilience against HAProxy.

Run it with `make bench` (or `python -m bench --help`); see bench/README.md.
"""

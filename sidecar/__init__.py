"""sidecar: a small resilience sidecar proxy.

A request flows through the modules in this order:
config -> discovery/cluster -> routing -> resilience -> upstream -> metrics/admin.
"""

__version__ = "0.1.0"

"""The admin port: the API and dashboard (app.py) behind the request guard (guard.py)."""

from sidecar.admin.app import HEAD_TIMEOUT, AdminHost, admin_runner, build_admin_app

__all__ = ["HEAD_TIMEOUT", "AdminHost", "admin_runner", "build_admin_app"]

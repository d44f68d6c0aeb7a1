"""The live dashboard on the admin port: `GET /dashboard` and `GET /admin/dashboard.json`.

window.py   a service's last minute of counter readings, and the numbers they give (pure)
sampler.py  the once-a-second task that reads the metrics registry into those windows,
            and the JSON view that joins them with the runtime snapshot
page.py     the page: one self-contained HTML file (dashboard.html, package data)
"""

from sidecar.dashboard.sampler import Sampler

__all__ = ["Sampler"]

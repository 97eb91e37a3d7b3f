"""The operator dashboard served by the coordinator at ``/dashboard`` (docs/operations.md, "Dashboard").

* :mod:`.auth` - operator login (admin token or argon2 password) and server-side sessions, CSRF tokens.
* :mod:`.pages` - templates and static files (package data; the chart library uPlot is vendored), headers.
* :mod:`.stream` - server-sent events: the live state, read once per interval for every open page.
* :mod:`.routes` - the routes: pages, JSON data, CSRF-checked actions, the event stream.
"""

from .auth import PASSWORD_FILE, OperatorAuth, write_password_file
from .routes import dashboard_router

__all__ = ["PASSWORD_FILE", "OperatorAuth", "dashboard_router", "write_password_file"]

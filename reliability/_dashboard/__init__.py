"""The web dashboard (``workflow-manager dashboard``) and the HTML batch report.

Needs the ``[dashboard]`` extra (starlette, uvicorn, jinja2). Pages, JSON and live events
over the configured store; see ``_app.py`` for what is safe about it.
"""

from ._app import create_app, render_report, timeline_context
from ._serve import RunningServer, start_server
from ._source import DashboardSource, runtime_directory
from ._timeline import estimated_finish, timeline

__all__ = ["DashboardSource", "RunningServer", "create_app", "estimated_finish",
           "render_report", "runtime_directory", "start_server", "timeline",
           "timeline_context"]

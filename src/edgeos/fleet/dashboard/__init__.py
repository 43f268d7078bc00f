"""The fleet's web dashboard under ``/ui/``: server-rendered pages behind operator sign-in."""

from edgeos.fleet.dashboard.routes import dashboard_routes

__all__ = ["dashboard_routes"]

"""The web console: the funnel, the links, a message's life, the queue, the destinations, the suppression list
and the reputation of each set, on its own listener ([console] listen, off by default).

- server: the HTTP shell (aiohttp, Jinja2 templates, static files with the charting library)
- auth: logins (SMTP AUTH's checks and limit), sessions, CSRF, where a request comes from
- pages: what each page shows, from the store's reads (relay/store/console.py, the inspection views) and the
  service functions (relay/sets.py, relay/suppression.py); the arithmetic is relay/core/console.py's, the
  click heatmap relay/core/heatmap.py's
"""

from relay.console.server import ConsoleServer

__all__ = ["ConsoleServer"]

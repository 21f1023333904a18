"""`/console`: the operator's web console, served by the gateway itself (issue 18).

One page of plain HTML, JS and CSS (static/, no build step, nothing from a CDN) over a
small JSON API under /admin/console/ (routes.py), behind the admin key. It shows the
backends' live load (state.py), the routes and the policy with its last reload, the
experiments with their sample counts (sample_counts.py) and A/B report (ab_view.py, which
alone imports the tools' room gateway.ab, and only when a report is asked for), the API
keys with their usage (keys.py: create, revoke), and a playground that chats through
/v1/chat/completions like any client.
"""

from gateway.console.routes import router

__all__ = ["router"]

"""The gateway's actors. The web layer asks them through the public helpers re-exported here."""

from ._util import ActorGone, ask, reply_once

__all__ = ["ActorGone", "ask", "reply_once"]

"""The gateway's actors. The web layer asks them through the public helpers re-exported here."""

from ._util import ActorGone, NoAnswer, ask, ask_within, reply_once

__all__ = ["ActorGone", "NoAnswer", "ask", "ask_within", "reply_once"]

"""The sending operations' shell: each planned message (relay/api/send.py) goes through the pipeline as an SMTP
message does, and is queued for delivery once durable; only then does the request get its MessageId.

A pipeline refusal becomes SES's error: an unknown set ConfigurationSetDoesNotExist, content relay refuses
(a bad tag, a virus) MessageRejected, a store that cannot take the message ServiceUnavailable (a 503 the SDKs
retry). A Rendering Failure is recorded as its set's event, and nothing is queued.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable

from relay.api.send import Outgoing, Plan, Result
from relay.pipeline import Refusal, StorageUnavailable, Submission
from relay.sets import SesError

log = logging.getLogger("relay.api")
_UNKNOWN_SET = re.compile(r"^554 Configuration Set does not exist: (.*)$", re.S)
_REPLY = re.compile(r"^(\d{3})(?: \d\.\d{1,3}\.\d{1,3})? ?(.*)$", re.S)
UNAVAILABLE = "The message could not be stored; try again later."


def refusal_error(reply: str, code: str | None = None, message: str | None = None) -> SesError:
    """SES's error for the pipeline's SMTP refusal of a message; sending control's refusals (a paused set or
    account, a quota) name their own API error."""
    if code:
        return SesError(code, message or "")
    unknown = _UNKNOWN_SET.match(reply)
    if unknown:
        return SesError("ConfigurationSetDoesNotExist", unknown.group(1))
    code, text = _REPLY.match(reply).groups() if _REPLY.match(reply) else ("554", reply)
    if code.startswith("4"):
        return SesError("ServiceUnavailable", text or UNAVAILABLE)
    return SesError("MessageRejected", text.removeprefix("Message rejected: "))


class Sender:
    """Hands planned messages to the pipeline; `on_accepted(msg, recipients)` queues a durable one."""

    def __init__(self, pipeline, on_accepted: Callable):
        self.pipeline = pipeline
        self.on_accepted = on_accepted

    async def send(self, plan: Plan, api_key: str, client_ip: str) -> list[Result]:
        """Every message of the plan, in order. Runs to its end even if the client goes away meanwhile: what was
        made durable is queued all the same."""
        return await asyncio.shield(asyncio.ensure_future(self._all(plan, api_key, client_ip)))

    async def _all(self, plan: Plan, api_key: str, client_ip: str) -> list[Result]:
        return [await self._one(plan.operation, out, api_key, client_ip) for out in plan.messages]

    async def _one(self, operation: str, out: Outgoing, api_key: str, client_ip: str) -> Result:
        sub = Submission(mail_from=out.mail_from, recipients=out.recipients, data=out.data or b"",
                         client_ip=client_ip, helo="api", auth_user=None, tls=False, operation=operation,
                         api_key=api_key, configuration_set=out.configuration_set, tags=out.tags)
        if out.rendering_failure is not None:
            message_id = await self.pipeline.record_rendering_failure(sub, out.template or "", out.rendering_failure)
            return Result(None if out.error else message_id, out.error)
        if out.error is not None:
            return Result(error=out.error)
        try:
            msg = await self.pipeline.accept(sub)
        except Refusal as exc:
            log.info("api %s from=<%s> refused: %s", operation, out.mail_from, exc.reply)
            return Result(error=refusal_error(exc.reply, exc.code, exc.message))
        except StorageUnavailable:
            return Result(error=SesError("ServiceUnavailable", UNAVAILABLE))
        self.on_accepted(msg, msg.to_deliver(sub.recipients))
        log.info("api %s id=%s from=<%s> rcpts=%d size=%d set=%s accepted", operation, msg.id, out.mail_from,
                 len(out.recipients), len(sub.data), msg.configuration_set or "-")
        return Result(msg.id)

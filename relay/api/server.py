"""The management API's HTTP shell: one aiohttp listener for SES v2 (`/v2/...`) and SES v1 (`POST /`).

Every request is verified (SigV4, relay/api/sigv4.py) before anything else is looked at; the operation
then runs in a worker thread (relay/sets.py waits on the store's writer) and its result or SesError is
shaped per protocol. Secrets are never logged: a request's log line names its access key id only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import parse_qsl

from aiohttp import web

from relay.api import sigv4, v1, v2
from relay.api.common import Context
from relay.api.errors import WireError, v1_error, v2_error
from relay.api.send import Plan, Result
from relay.api.sending import Sender
from relay.config import Config
from relay.sets import SesError
from relay.store import Store

log = logging.getLogger("relay.api")
INTERNAL = WireError(500, "InternalFailure", "The request processing has failed because of an unknown error.", False)


def _json_response(status: int, data: dict, request_id: str, error_type: str | None = None) -> web.Response:
    headers = {"x-amzn-RequestId": request_id}
    if error_type:
        headers["x-amzn-ErrorType"] = error_type
    return web.Response(status=status, body=json.dumps(data).encode(), content_type="application/json",
                        headers=headers)


def _xml_response(status: int, text: str, request_id: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/xml", headers={"x-amzn-RequestId": request_id})


def error_response(protocol: str, err: WireError, request_id: str) -> web.Response:
    if protocol == "v2":
        return _json_response(err.status, {"message": err.message}, request_id, err.code)
    return _xml_response(err.status, v1.error_xml(err, request_id), request_id)


def _split(raw_path: str) -> tuple[str, str]:
    path, _, query = raw_path.partition("?")
    return path, query


class ApiServer:
    """Started by `Relay.start` when [[api.access_keys]] are configured. `config` is a callable, so a
    reloaded configuration (SIGHUP: keys, ARN mappings, sets) applies to the next request."""

    def __init__(self, config: Callable[[], Config], store: Store, sender: Sender | None = None):
        self._config, self.store = config, store
        self.sender = sender  # the sending operations' way into the pipeline; None: they are refused
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        api = self._config().api
        if not api.enabled:
            log.info("management API disabled: no [[api.access_keys]] in the configuration")
            return
        app = web.Application(client_max_size=api.max_body)  # a Raw message at its limit, encoded
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, api.listen_host, api.listen_port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        log.info("management API (SES v1 and v2) on http://%s:%d, %d access key(s)", api.listen_host, self.port,
                 len(api.access_keys))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        request_id = str(uuid.uuid4())
        path, query = _split(request.raw_path)
        protocol = "v2" if path.startswith("/v2/") else "v1"
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error_response(protocol, WireError(413, "RequestEntityTooLarge", "Request body too large."),
                                  request_id)
        cfg = self._config()
        signed = sigv4.Request(request.method, path, query, tuple(request.headers.items()), body)
        try:
            key_id = sigv4.verify(signed, {k.id: k.secret for k in cfg.api.access_keys}, datetime.now(UTC),
                                  cfg.api.regions, cfg.api.max_skew)
        except sigv4.AuthError as exc:
            log.warning("api %s %s refused: %s (%s)", request.method, path, exc.code, request.remote)
            # SES v2 names an unknown key (or a session token relay never issued) otherwise than v1
            code = "UnrecognizedClientException" if protocol == "v2" and exc.code == "InvalidClientTokenId" \
                else exc.code
            err = WireError(exc.status, code, exc.message)
            return error_response(protocol, err, request_id)
        ctx = Context(cfg, self.store, f"api:{key_id}")
        client = request.remote or ""
        if protocol == "v2":
            return await self._v2(ctx, request.method, path, query, body, request_id, key_id, client)
        params = parse_qsl(body.decode("utf-8", "replace") if request.method == "POST" else query,
                           keep_blank_values=True)
        return await self._v1(ctx, params, request_id, key_id, client)

    async def _send(self, ctx: Context, plan_of: Callable[[], Plan], key_id: str, client: str
                    ) -> tuple[Plan, list[Result]]:
        """A sending operation: planned in a worker thread (decoding, rendering, MIME), then sent."""
        if self.sender is None:
            raise SesError("ServiceUnavailable", "This relay does not send through the API.")
        plan = await asyncio.to_thread(plan_of)
        return plan, await self.sender.send(plan, key_id, client)

    async def _v2(self, ctx: Context, method: str, path: str, query: str, body: bytes, request_id: str,
                  key_id: str, client: str) -> web.Response:
        found = v2.route(method, path)
        if found is None:
            err = WireError(404, "UnknownOperationException", f"No operation at {method} {path}.")
            return error_response("v2", err, request_id)
        op, params = found
        try:
            if op in v2.SEND_PLANS:
                plan, results = await self._send(ctx, lambda: v2.SEND_PLANS[op](ctx, v2.parse_body(body)), key_id,
                                                 client)
                data = v2.send_response(plan, results)
            else:
                data = await asyncio.to_thread(v2.dispatch, ctx, op, params, query, body)
        except SesError as exc:
            log.info("api %s by %s: %s", op, key_id, exc.code)
            return error_response("v2", v2_error(exc.code, exc.message), request_id)
        except Exception:  # a store fault: SES's shape, so clients retry it as a server error
            log.exception("api %s by %s failed", op, key_id)
            return error_response("v2", INTERNAL, request_id)
        log.info("api %s by %s: ok", op, key_id)
        return _json_response(200, data, request_id)

    async def _v1(self, ctx: Context, params: list[tuple[str, str]], request_id: str, key_id: str,
                  client: str) -> web.Response:
        action = v1.action_of(params)
        if action not in v1.ACTIONS and action not in v1.SEND_PLANS:
            err = v1_error("InvalidAction", f"The action {action} is not valid for this web service.")
            return error_response("v1", err, request_id)
        try:
            if action in v1.SEND_PLANS:
                plan, results = await self._send(ctx, lambda: v1.send_plan(ctx, action, params), key_id, client)
                inner = v1.send_response(plan, results)
            else:
                inner = await asyncio.to_thread(v1.dispatch, ctx, action, params)
        except SesError as exc:
            log.info("api %s by %s: %s", action, key_id, exc.code)
            return error_response("v1", v1_error(exc.code, exc.message), request_id)
        except Exception:
            log.exception("api %s by %s failed", action, key_id)
            return error_response("v1", INTERNAL, request_id)
        log.info("api %s by %s: ok", action, key_id)
        return _xml_response(200, v1.response_xml(action, inner, request_id), request_id)

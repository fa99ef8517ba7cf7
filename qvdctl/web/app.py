"""The web admin's Starlette application: pages, forms, the live feed, and who may do what.

Every page and feed needs a session (the ``qvd_session`` cookie); without one a page
redirects to the login and anything else answers 401. Every POST carries a CSRF token
in a form field: the session's, or before there is a session, the login form's own
(``qvd_login``, a cookie the login page sets: a login posted from another site, which
would log the browser into the attacker's account, has neither). Only an ``admin``
may post a change: a ``viewer``'s POST answers 403. A form names each object it acts
on with its revision as the page showed it (``ID:REVISION``, ``pages.revision``), and a
change to an object that changed since the page was made is refused with a line
saying so. Each change is a row of the
audit log.

The database layer is synchronous (SQLAlchemy Core, as the CLI uses it), so each
request's queries run in a worker thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, Request
from starlette.responses import (
    JSONResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse,
)
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from qvdctl import audit
from qvdctl.db import store
from qvdctl.db.states import VmState
from qvdctl.errors import QvdError
from qvdctl.images.halt import SIGNALS
from qvdctl.node import Node
from qvdctl.vm.health import reconcile
from qvdctl.web import accounts, actions, console, counters, live, pages

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
COOKIE = "qvd_session"
LOGIN_COOKIE = "qvd_login"  # the login form's CSRF token, until there is a session
# Pages and scripts come from this server only; no inline script, no framing.
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]

# The halt signals the forms offer, with the inits that want them; the CLI takes any.
HALT_SIGNALS = [(signal, init) for init, signal in SIGNALS.items()]

Session = dict[str, Any]
Handler = Callable[[Request, Session], Awaitable[Response]]


class _SecurityHeaders:
    """Adds ``SECURITY_HEADERS`` to every response (a pure ASGI wrapper: streams stay streams)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(node: Node) -> ASGIApp:
    """The web admin of ``node``'s database (the caller closes the node)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    env.globals["revision"] = pages.revision
    templates = Jinja2Templates(env=env)
    feed = live.VmFeed(node)
    # Result lines of a session's last POST, shown once by the page it redirects to.
    flashes: dict[str, list[tuple[str, str | None]]] = {}

    async def db(fn: Callable[..., Any], *args: Any, write: bool = False) -> Any:
        def run() -> Any:
            with (node.db.writer() if write else node.db.reader()) as conn:
                return fn(conn, *args)
        return await run_in_threadpool(run)

    async def current(request: HTTPConnection) -> Session | None:
        token = request.cookies.get(COOKIE)
        if not token:
            return None
        found: Session | None = await db(accounts.session, token)
        if found is None:
            return None
        if time.time() - found["last_seen"] > accounts.TOUCH_EVERY_S:
            await db(accounts.touch, token, write=True)
        found["token"] = token
        return found

    def render(request: Request, session: Session, name: str, **context: Any) -> Response:
        return templates.TemplateResponse(request, name, {
            "me": session, "csrf": session["csrf"], "flash": flashes.pop(session["token"], []),
            "path": request.url.path, **context})

    def page(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session = await current(request)
            if session is None:
                return RedirectResponse("/login", status_code=303)
            return await handler(request, session)
        return endpoint

    def csrf_refused(posted: object, expected: str | None) -> Response | None:
        """The 403 for a form whose CSRF token is not ``expected``; None if it is."""
        if (isinstance(posted, str) and expected is not None
                and hmac.compare_digest(posted, expected)):
            return None
        return PlainTextResponse("missing or stale CSRF token: reload the page",
                                 status_code=403)

    def post(handler: Handler, *, admin: bool = True) -> Callable[[Request], Awaitable[Response]]:
        """A POST: a session and its CSRF token first, and (``admin``) the admin role."""
        async def endpoint(request: Request) -> Response:
            session = await current(request)
            if session is None:
                return PlainTextResponse("not logged in", status_code=401)
            form = await request.form()
            if refused := csrf_refused(form.get("csrf"), session["csrf"]):
                return refused
            if admin and session["role"] != accounts.Role.ADMIN:
                return PlainTextResponse("viewers cannot change anything", status_code=403)
            return await handler(request, session)
        return endpoint

    def origin(request: HTTPConnection) -> str:
        return request.client.host if request.client else "?"

    # --- logging in and out ---------------------------------------------------------

    def login_page(request: Request, error: str | None, status_code: int = 200) -> Response:
        """The login form with a fresh CSRF token, set in its cookie too."""
        token = secrets.token_urlsafe(32)
        response = templates.TemplateResponse(
            request, "login.html", {"error": error, "csrf": token}, status_code=status_code)
        response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/login")
        return response

    async def login_form(request: Request) -> Response:
        return login_page(request, None)

    async def login(request: Request) -> Response:
        form = await request.form()
        # Checked before the password: a forged login counts no failure against anyone.
        if refused := csrf_refused(form.get("csrf"), request.cookies.get(LOGIN_COOKIE)):
            return refused
        login_name, password = str(form.get("login", "")), str(form.get("password", ""))

        def attempt(conn: Any) -> str | QvdError:
            try:
                admin = accounts.log_in(conn, login_name, password)
            except accounts.LoginRefused as exc:
                return exc  # returned, not raised: the failure count must commit
            return accounts.open_session(conn, admin["id"])

        outcome = await db(attempt, write=True)
        await run_in_threadpool(
            audit.record, node.db, who=login_name, origin=origin(request), action="web login",
            obj="", args="", result=str(outcome) if isinstance(outcome, QvdError) else audit.OK)
        if isinstance(outcome, QvdError):
            return login_page(request, str(outcome), status_code=403)
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        response.set_cookie(COOKIE, outcome, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")
        return response

    async def logout(request: Request, session: Session) -> Response:
        await db(accounts.close_session, session["token"], write=True)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # --- pages ----------------------------------------------------------------------

    async def dashboard(request: Request, session: Session) -> Response:
        data = await db(lambda conn: pages.dashboard(conn, node.settings()))
        return render(request, session, "dashboard.html", **data)

    async def vm_list(request: Request, session: Session) -> Response:
        # As `vm list`: a VM of this node recorded running whose root or container is
        # gone shows as the zombie it is.
        await run_in_threadpool(reconcile, node)
        filters = pages.filters_of(request.query_params, pages.VM_FILTERS)
        rows = await db(pages.vm_list, filters)
        return render(request, session, "vms.html", vms=rows,
                      filters=dict.fromkeys(pages.VM_FILTERS, "") | dict(filters),
                      states=[s.value for s in VmState], fleet=node.fleet)

    async def vm_page(request: Request, session: Session) -> Response:
        vm_id = request.path_params["vm_id"]
        try:
            vm = await db(store.get_vm, vm_id)
        except QvdError as exc:
            return PlainTextResponse(str(exc), status_code=404)
        history = await db(pages.log_rows, [("object", f"*{vm['name']}*")])
        root = await run_in_threadpool(counters.vm_usage, node, vm)
        return render(request, session, "vm.html", vm=vm, history=history, root=root)

    # --- a VM's console -------------------------------------------------------------

    def console_refused(vm: store.Row) -> str | None:
        """Why this server cannot open ``vm``'s console; None if it can."""
        if vm["state"] != VmState.RUNNING:
            return f"the VM is {vm['state']}"
        if vm["host"] != node.name():
            return f"the VM runs on host {vm['host']}: open its console from a web admin there"
        return None

    async def console_page(request: Request, session: Session) -> Response:
        if session["role"] != accounts.Role.ADMIN:
            return PlainTextResponse("viewers cannot open a console", status_code=403)
        try:
            vm = await db(store.get_vm, request.path_params["vm_id"])
        except QvdError as exc:
            return PlainTextResponse(str(exc), status_code=404)
        return render(request, session, "console.html", vm=vm, why=console_refused(vm))

    async def console_socket(websocket: WebSocket) -> None:
        session = await current(websocket)
        scheme = "https" if websocket.url.scheme == "wss" else "http"
        # A WebSocket is not bound by the same-origin policy: a page of another site
        # could open one with this browser's cookie, were it not for this check.
        same_origin = websocket.headers.get("origin") == f"{scheme}://{websocket.url.netloc}"
        if session is None or session["role"] != accounts.Role.ADMIN or not same_origin:
            await websocket.close(code=1008)  # before accepting: the handshake gets a 403
            return
        try:
            vm = await db(store.get_vm, websocket.path_params["vm_id"])
        except QvdError:
            await websocket.close(code=1008)
            return
        why = console_refused(vm)
        await run_in_threadpool(
            audit.record, node.db, who=session["login"], origin=origin(websocket),
            action="vm console", obj=vm["name"], args="", result=why or audit.OK)
        await websocket.accept()
        if why is not None:
            await websocket.close(code=1008, reason=why)
            return
        from qvdctl.container import seam  # here: it loads liblxc

        argv = seam.console_command(vm["id"], settings=node.settings())
        await console.bridge(websocket, argv, {**os.environ, "TERM": "xterm-256color"})

    async def host_list(request: Request, session: Session) -> Response:
        rows = await db(lambda conn: pages.host_rows(conn, node.settings()))
        return render(request, session, "hosts.html", hosts=rows)

    async def user_list(request: Request, session: Session) -> Response:
        return render(request, session, "users.html", users=await db(pages.user_rows))

    async def image_list(request: Request, session: Session) -> Response:
        data = await db(pages.images)
        imported = {di["path"] for di in data["dis"]}
        staged = [name for name in await run_in_threadpool(actions.staged_images, node)
                  if name not in imported]
        return render(request, session, "images.html", **data, staged=staged,
                      signals=HALT_SIGNALS, from_init=actions.HALT_FROM_INIT)

    async def config_page(request: Request, session: Session) -> Response:
        rows = await db(lambda conn: pages.config_rows(conn, node.settings()))
        return render(request, session, "config.html", settings=rows)

    async def log_page(request: Request, session: Session) -> Response:
        filters = pages.filters_of(request.query_params, pages.LOG_FILTERS)
        rows = await db(pages.log_rows, filters)
        return render(request, session, "log.html", entries=rows,
                      filters=dict.fromkeys(pages.LOG_FILTERS, "") | dict(filters))

    # --- changes --------------------------------------------------------------------

    async def act(request: Request, session: Session) -> Response:
        obj = request.path_params["obj"]
        form = await request.form()
        action = str(form.get("action", ""))
        back = {"vm": "/vms", "host": "/hosts", "user": "/users", "di": "/images",
                "osf": "/images"}.get(obj, "/")
        # Each object chosen, as ID:REVISION (pages.revision) from the pages, or as ID
        # alone from a hand-made post, whose objects are then not checked for staleness.
        chosen, revs = [], []
        for value in map(str, form.getlist("id")):
            chosen.append(value.partition(":")[0])
            if ":" in value:
                revs.append(value)
        fields = {k: v for k, v in form.items()
                  if isinstance(v, str) and k not in ("csrf", "action", "id")
                  and not k.startswith("f_")}
        why_stale: list[str] = []
        if obj in pages.REVISED and revs:
            why_stale = await db(pages.stale, obj, revs)
        if action not in actions.ACTIONS.get(obj, {}):
            outcome: actions.Outcome = [(f"{obj} {action}", "unknown action")]
        elif not all(v.isdigit() for v in chosen):
            outcome = [(f"{obj} {action}", "bad id")]
        elif why_stale:
            outcome = [(f"{obj} {action}",
                        "; ".join(why_stale) + ": reload the page; nothing changed")]
        else:
            posted = actions.Posted([int(v) for v in chosen], fields)
            try:
                outcome = await run_in_threadpool(actions.ACTIONS[obj][action], node, posted)
            except QvdError as exc:
                outcome = [(f"{obj} {action}", str(exc))]
        names = ",".join(name for name, _ in outcome)
        errors = [f"{name}: {error}" for name, error in outcome if error is not None]
        words = ([f"ids={','.join(chosen)}"] if chosen else []) + [
            f"{k}={v}" for k, v in fields.items()]
        await run_in_threadpool(
            audit.record, node.db, who=session["login"], origin=origin(request),
            action=f"{obj} {action}", obj=names, args=audit.shown_args(words),
            result="; ".join(errors) or audit.OK)
        lines = [(f"{obj} {action} {name}", error) for name, error in outcome]
        if "application/json" in request.headers.get("accept", ""):
            # The VMs page's script posts this way and stays open: no reload.
            return JSONResponse([{"what": what, "error": error} for what, error in lines])
        flashes[session["token"]] = lines
        filters = {k: v for k, v in form.items() if k.startswith("f_") and isinstance(v, str)}
        query = urlencode({k[2:]: v for k, v in filters.items() if v})
        return RedirectResponse(back + ("?" + query if query else ""), status_code=303)

    # --- live -----------------------------------------------------------------------

    async def vm_events(request: Request) -> Response:
        if await current(request) is None:
            return PlainTextResponse("not logged in", status_code=401)

        async def stream() -> AsyncIterator[str]:
            # Starlette cancels this when the browser goes away.
            async for states in feed.events():
                yield f"data: {states}\n\n" if states else ": keep-alive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store"})

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        feed.start()
        try:
            yield
        finally:
            feed.stop()

    routes = [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", post(logout, admin=False), methods=["POST"]),
        Route("/", page(dashboard)),
        Route("/vms", page(vm_list)),
        Route("/vms/{vm_id:int}", page(vm_page)),
        Route("/vms/{vm_id:int}/console", page(console_page)),
        WebSocketRoute("/vms/{vm_id:int}/console/socket", console_socket),
        Route("/hosts", page(host_list)),
        Route("/users", page(user_list)),
        Route("/images", page(image_list)),
        Route("/config", page(config_page)),
        Route("/log", page(log_page)),
        Route("/act/{obj}", post(act), methods=["POST"]),
        Route("/events/vms", vm_events),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return _SecurityHeaders(Starlette(routes=routes, lifespan=lifespan))

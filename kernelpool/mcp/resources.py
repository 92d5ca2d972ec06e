"""A user's notebooks and their outputs as MCP resources; completion; `logging/setLevel`.

URIs name a path relative to the caller's own folder, percent-encoded (`/` kept):

- `notebook://{path}`: the notebook as JSON (`application/x-ipynb+json`);
  `notebook://{path}?format=markdown`: a markdown rendering with outputs summarised.
- `file://{path}`: any regular file of the user's, a page at a time (`?offset=N`, a byte offset;
  the next page's URI in `_meta.next`): text as text, anything else as a blob. `read_file` links
  to the rest of a file it did not return whole.
- `output://{notebook}/{cell_id}/{index}`: one saved output of a code cell; text comes in
  pages of `max_output_chars` (`?offset=N`, the next page's URI in `_meta.next`), an image as
  a blob. Tool results link to these (`resource_link`) when an output is too large to inline.

Every URI is resolved against the caller's folder with the tools' path rules, so another user's
notebook is never reached: it is "not found" like any missing one. The handlers are registered
on the low-level server (not `MCPServer`'s static resource manager) because the list is per
user. Callers: `server.build_mcp`.
"""

from __future__ import annotations

import logging
import mimetypes
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, quote, unquote

from mcp import MCPError
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.types import (
    BlobResourceContents,
    CompleteRequestParams,
    CompleteResult,
    Completion,
    EmptyResult,
    ListResourcesResult,
    ListResourceTemplatesResult,
    PaginatedRequestParams,
    ReadResourceRequestParams,
    ReadResourceResult,
    Resource,
    ResourceLink,
    ResourceTemplate,
    ResourceTemplateReference,
    SetLevelRequestParams,
    SubscribeRequestParams,
    TextResourceContents,
    UnsubscribeRequestParams,
)
from nbformat import NotebookNode
from nbformat import writes as nb_writes

from kernelpool.errors import InvalidArgument, KernelpoolError
from kernelpool.mcp.content import b64_size, output_text, truncate
from kernelpool.mcp.services import Services
from kernelpool.mcp.wire import clean_text
from kernelpool.notebooks.cells import OutputPage
from kernelpool.notebooks.paths import check_file_path, check_notebook_path

log = logging.getLogger(__name__)

RESOURCE_NOT_FOUND = -32002  # the code the MCP specification gives "resource not found"
NOTEBOOK_TEMPLATE = "notebook://{path}{?format}"
OUTPUT_TEMPLATE = "output://{notebook}/{cell_id}/{index}{?offset}"
FILE_TEMPLATE = "file://{path}{?offset}"
NOTEBOOK_MIME = "application/x-ipynb+json"
_PAGE = 500  # resources per resources/list page
_COMPLETIONS = 100
_IMAGES = ("image/png", "image/jpeg", "image/svg+xml", "image/gif")

RequestContext = ServerRequestContext[Any, Any]


def notebook_uri(path: str) -> str:
    # a file name of bytes that are not UTF-8 has surrogate escapes, which quote() cannot encode
    return "notebook://" + quote(clean_text(path), safe="/")


def file_uri(path: str) -> str:
    return "file://" + quote(clean_text(path), safe="/")


def output_uri(notebook: str, cell_id: str, index: int) -> str:
    return f"output://{quote(clean_text(notebook), safe='/')}/{quote(clean_text(cell_id), safe='')}/{index}"


def _split(uri: str, scheme: str) -> tuple[str, dict[str, str]] | None:
    if not uri.startswith(scheme + "://"):
        return None
    rest, _, query = uri[len(scheme) + 3:].partition("?")
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    return rest, params


def _not_found(uri: str, reason: str) -> MCPError:
    return MCPError(code=RESOURCE_NOT_FOUND, message=f"resource not found: {uri} ({reason})", data={"uri": uri})


def _user() -> str:
    token = get_access_token()
    if token is None:  # the SDK's auth middleware runs first; this is a wiring bug
        raise MCPError(code=-32600, message="not authenticated")
    return token.client_id


def session_of(ctx: RequestContext) -> str | None:
    headers = getattr(ctx.request, "headers", None)
    return headers.get("mcp-session-id") if headers is not None else None


# ---- rendering ------------------------------------------------------------------------------

def markdown(path: str, nb: NotebookNode, *, summary_chars: int = 500) -> str:
    """The notebook as markdown: markdown cells as they are, code in fences, outputs summarised."""
    parts = [f"# {path}\n"]
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            parts.append(cell.source)
        elif cell.cell_type == "code":
            count = cell.get("execution_count")
            parts.append(f"```python\n# [{i}] In [{count if count is not None else ' '}] id={cell.get('id')}\n{cell.source}\n```")
            for j, out in enumerate(cell.get("outputs", [])):
                parts.append(_summary(out, j, summary_chars))
        else:
            parts.append(f"```\n{cell.source}\n```")
    return "\n\n".join(parts) + "\n"


def _summary(out: NotebookNode, index: int, chars: int) -> str:
    data = out.get("data", {}) if out.get("output_type") in ("execute_result", "display_data") else {}
    image = next((m for m in _IMAGES if m in data), None)
    lines = []
    if image is not None:
        size = b64_size("".join(data[image]).replace("\n", "")) if image != "image/svg+xml" else len("".join(data[image]))
        lines.append(f"> output {index}: {image} image, {size} bytes")
    text = output_text(out)
    if text is not None and not (image is not None and text.startswith("<Figure")):
        shown, cut = truncate(text, chars)
        quoted = "\n".join("> " + line for line in shown.splitlines())
        lines.append(f"> output {index} ({out.get('output_type')}{', ' + str(cut) + ' characters cut' if cut else ''}):\n{quoted}")
    return "\n".join(lines) or f"> output {index}: {out.get('output_type')}"


def output_links(notebook: str, cell_id: str, outputs: list[NotebookNode], max_chars: int,
                 max_image_bytes: int) -> list[ResourceLink]:
    """Links to the outputs of a saved cell that are too large to inline in a tool result."""
    links = []
    for i, out in enumerate(outputs):
        data = out.get("data", {}) if out.get("output_type") in ("execute_result", "display_data") else {}
        image = next((m for m in ("image/png", "image/jpeg") if m in data), None)
        if image is not None and b64_size("".join(data[image]).replace("\n", "")) > max_image_bytes:
            links.append(ResourceLink(uri=output_uri(notebook, cell_id, i), name=f"{notebook} cell {cell_id} output {i}",
                                      mime_type=image, description="image over the inline limit"))
            continue
        text = output_text(out)
        if text is not None and image is None and len(text) > max_chars:
            links.append(ResourceLink(uri=output_uri(notebook, cell_id, i), name=f"{notebook} cell {cell_id} output {i}",
                                      mime_type="text/plain", size=len(text),
                                      description=f"{len(text)} characters; read in pages of {max_chars}"))
    return links


# ---- handlers -----------------------------------------------------------------------------

def register(server: Server[Any], s: Services, attach: Callable[[RequestContext], None]) -> None:
    """Add resources, subscriptions, completion and logging/setLevel to the low-level server."""
    h = _Handlers(s, attach)
    server.add_request_handler("resources/list", PaginatedRequestParams, h.list_resources)
    server.add_request_handler("resources/templates/list", PaginatedRequestParams, h.list_templates)
    server.add_request_handler("resources/read", ReadResourceRequestParams, h.read)
    server.add_request_handler("resources/subscribe", SubscribeRequestParams, h.subscribe)
    server.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, h.unsubscribe)
    server.add_request_handler("completion/complete", CompleteRequestParams, h.complete)
    server.add_request_handler("logging/setLevel", SetLevelRequestParams, h.set_level)


class _Handlers:
    """The request handlers; `attach` records a request's session handle for notices."""

    def __init__(self, s: Services, attach: Callable[[RequestContext], None]) -> None:
        self.s = s
        self.attach = attach

    async def _load(self, user: str, path: str, uri: str) -> NotebookNode:
        try:
            return await self.s.notebooks.load(user, check_notebook_path(path))
        except KernelpoolError as exc:
            raise _not_found(uri, str(exc)) from None

    async def list_resources(self, ctx: RequestContext, params: PaginatedRequestParams) -> ListResourcesResult:
        user = _user()
        paths = (await self.s.notebooks.list_notebooks(user)).items
        start = 0
        if params.cursor:
            if not params.cursor.isdigit():
                raise MCPError(code=-32602, message=f"invalid cursor {params.cursor!r}")
            start = int(params.cursor)
        page = paths[start:start + _PAGE]
        more = start + _PAGE < len(paths)
        return ListResourcesResult(
            resources=[Resource(uri=notebook_uri(p), name=p, title=p.rsplit("/", 1)[-1], mime_type=NOTEBOOK_MIME,
                                description="notebook (JSON; add ?format=markdown for a markdown rendering)")
                       for p in page],
            next_cursor=str(start + _PAGE) if more else None,
        )

    async def list_templates(self, ctx: RequestContext, params: PaginatedRequestParams) -> ListResourceTemplatesResult:
        return ListResourceTemplatesResult(resource_templates=[
            ResourceTemplate(uri_template=NOTEBOOK_TEMPLATE, name="notebook",
                             description="one of your notebooks, by path relative to your folder: JSON "
                                         f"({NOTEBOOK_MIME}), or format=markdown for text/markdown with outputs summarised"),
            ResourceTemplate(uri_template=FILE_TEMPLATE, name="file",
                             description="any file of yours, by path relative to your folder, a page at a time from "
                                         "byte offset (text as text, other files as blobs; _meta.next is the next page)"),
            ResourceTemplate(uri_template=OUTPUT_TEMPLATE, name="output",
                             description="one saved output of a code cell (index from 0): text in pages "
                                         f"(offset; {self.s.settings.max_output_chars} characters each), images as blobs"),
        ])

    async def read(self, ctx: RequestContext, params: ReadResourceRequestParams) -> ReadResourceResult:
        user = _user()
        uri = params.uri
        if (nbref := _split(uri, "notebook")) is not None:
            path, query = nbref
            fmt = query.get("format", "json")
            if fmt not in ("json", "markdown"):
                raise MCPError(code=-32602, message=f"invalid format {fmt!r}: use json or markdown", data={"uri": uri})
            nb = await self._load(user, unquote(path), uri)
            if fmt == "markdown":
                return ReadResourceResult(contents=[TextResourceContents(uri=uri, mime_type="text/markdown",
                                                                         text=markdown(unquote(path), nb))])
            return ReadResourceResult(contents=[TextResourceContents(uri=uri, mime_type=NOTEBOOK_MIME, text=nb_writes(nb))])
        if (outref := _split(uri, "output")) is not None:
            return await self._read_output(user, uri, *outref)
        if (fileref := _split(uri, "file")) is not None:
            return await self._read_file(user, uri, *fileref)
        raise _not_found(uri, "kernelpool serves notebook://, file:// and output:// URIs")

    async def _read_file(self, user: str, uri: str, path: str, query: dict[str, str]) -> ReadResourceResult:
        offset_text = query.get("offset", "0")
        if not offset_text.isdigit():
            raise MCPError(code=-32602, message=f"invalid offset {offset_text!r}: a byte offset, 0 or more", data={"uri": uri})
        files, offset = self.s.files, int(offset_text)
        try:
            checked = check_file_path(unquote(path))
            page = await files.read(user, checked, offset, self.s.settings.max_output_chars, "auto")
            if page.encoding == "base64":  # a blob: pages as large as one call may read
                page = await files.read(user, checked, offset, files.max_bytes, "base64")
        except InvalidArgument as exc:
            raise MCPError(code=-32602, message=str(exc), data={"uri": uri}) from None
        except KernelpoolError as exc:
            raise _not_found(uri, str(exc)) from None
        following = page.next_offset
        meta = {"offset": offset, "size": page.size, "length": page.length,
                "next": f"{file_uri(checked)}?offset={following}" if following is not None else None}
        mime = mimetypes.guess_type(checked)[0]
        if page.encoding == "base64":
            blob = BlobResourceContents(uri=uri, mime_type=mime or "application/octet-stream", blob=page.text, _meta=meta)
            return ReadResourceResult(contents=[blob])
        return ReadResourceResult(contents=[TextResourceContents(uri=uri, mime_type=mime or "text/plain", text=page.text,
                                                                 _meta=meta)])

    async def _read_output(self, user: str, uri: str, rest: str, query: dict[str, str]) -> ReadResourceResult:
        parts = rest.rsplit("/", 2)
        if len(parts) != 3 or not parts[2].isdigit():
            raise _not_found(uri, "expected output://{notebook}/{cell_id}/{index}")
        path, cell_id, index = unquote(parts[0]), unquote(parts[1]), int(parts[2])
        nb = await self._load(user, path, uri)
        cell = next((c for c in nb.cells if c.get("id") == cell_id and c.cell_type == "code"), None)
        if cell is None or index >= len(cell.outputs):
            raise _not_found(uri, f"no output {index} of a code cell {cell_id!r} in {path}")
        out = cell.outputs[index]
        data = out.get("data", {}) if out.get("output_type") in ("execute_result", "display_data") else {}
        image = next((m for m in ("image/png", "image/jpeg", "image/gif") if m in data), None)
        if image is not None:
            encoded = "".join(data[image]).replace("\n", "")
            return ReadResourceResult(contents=[BlobResourceContents(uri=uri, mime_type=image, blob=encoded)])
        text = output_text(out) or ""
        offset_text = query.get("offset", "0")
        if not offset_text.isdigit() or int(offset_text) > len(text):
            raise MCPError(code=-32602, message=f"invalid offset {offset_text!r}: use 0..{len(text)}", data={"uri": uri})
        offset = int(offset_text)
        page = OutputPage(text[offset:offset + self.s.settings.max_output_chars], offset, len(text))
        following = page.next_offset
        base = output_uri(path, cell_id, index)
        meta = {"offset": offset, "total_chars": len(text), "next": f"{base}?offset={following}" if following is not None else None}
        return ReadResourceResult(contents=[TextResourceContents(uri=uri, mime_type="text/plain", text=page.text, _meta=meta)])

    async def subscribe(self, ctx: RequestContext, params: SubscribeRequestParams) -> EmptyResult:
        user = _user()
        sid = _session_required(ctx, "resources/subscribe")
        ref = _split(params.uri, "notebook")
        if ref is None:
            raise _not_found(params.uri, "only notebook:// resources can be subscribed to")
        path = check_notebook_path(unquote(ref[0])) if _path_ok(unquote(ref[0])) else None
        if path is None:
            raise _not_found(params.uri, "not a notebook path")
        await self._load(user, path, params.uri)
        self.attach(ctx)
        self.s.notices.subscribe(user, sid, notebook_uri(path))
        return EmptyResult()

    async def unsubscribe(self, ctx: RequestContext, params: UnsubscribeRequestParams) -> EmptyResult:
        user = _user()
        sid = _session_required(ctx, "resources/unsubscribe")
        ref = _split(params.uri, "notebook")
        uri = notebook_uri(unquote(ref[0])) if ref is not None else params.uri
        self.s.notices.unsubscribe(user, sid, uri)
        return EmptyResult()

    async def complete(self, ctx: RequestContext, params: CompleteRequestParams) -> CompleteResult:
        user = _user()
        ref, arg = params.ref, params.argument
        values: list[str] = []
        if isinstance(ref, ResourceTemplateReference) and ref.uri in (NOTEBOOK_TEMPLATE, OUTPUT_TEMPLATE):
            known = dict(params.context.arguments or {}) if params.context else {}
            if arg.name in ("path", "notebook"):
                paths = (await self.s.notebooks.list_notebooks(user)).items  # bounded, in the user's file-work turns
                values = [p for p in paths if p.startswith(arg.value)]
                if not values:  # then anything containing what was typed
                    values = [p for p in paths if arg.value in p]
            elif ref.uri == OUTPUT_TEMPLATE and arg.name in ("cell_id", "index") and known.get("notebook"):
                values = await self._complete_output(user, arg.name, arg.value, known)
            elif arg.name == "format":
                values = [f for f in ("json", "markdown") if f.startswith(arg.value)]
        return CompleteResult(completion=Completion(values=values[:_COMPLETIONS], total=len(values),
                                                    has_more=len(values) > _COMPLETIONS))

    async def _complete_output(self, user: str, name: str, typed: str, known: dict[str, str]) -> list[str]:
        """Completions of an output URI's cell_id or index, in the notebook already chosen."""
        try:
            nb = await self.s.notebooks.load(user, check_notebook_path(known["notebook"]))
        except KernelpoolError:
            nb = None
        cells = [c for c in nb.cells if c.cell_type == "code" and c.outputs] if nb is not None else []
        if name == "cell_id":
            return [c.id for c in cells if c.id.startswith(typed)]
        cell = next((c for c in cells if c.id == known.get("cell_id")), None)
        values = [str(i) for i in range(len(cell.outputs))] if cell is not None else []
        return [v for v in values if v.startswith(typed)]

    async def set_level(self, ctx: RequestContext, params: SetLevelRequestParams) -> EmptyResult:
        user = _user()
        sid = session_of(ctx)
        if sid is not None:
            self.attach(ctx)
            self.s.notices.set_level(user, sid, params.level)
        return EmptyResult()


def _session_required(ctx: RequestContext, what: str) -> str:
    sid = session_of(ctx)
    if sid is None:
        raise MCPError(code=-32600, message=f"{what} needs an MCP session (protocol 2025-11-25 or older)")
    return sid


def _path_ok(path: str) -> bool:
    try:
        check_notebook_path(path)
        return True
    except KernelpoolError:
        return False

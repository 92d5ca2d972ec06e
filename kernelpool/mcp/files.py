"""Tools on the other files of a user's folder: read_file, write_file, delete_file.

Each checks the path with the notebooks' rules and calls `kernelpool.notebooks.files.FileService`,
which bounds every call by max_file_bytes and the user's disk quota. A page that does not reach
the end of the file links to the rest as a `file://` resource (`kernelpool.mcp.resources`).
"""

from __future__ import annotations

import mimetypes

from mcp.types import CallToolResult, ResourceLink

from kernelpool.mcp.call import DESTRUCTIVE, EDIT, READ, Call, Tools, result
from kernelpool.mcp.resources import file_uri
from kernelpool.notebooks.files import ReadEncoding, WriteEncoding, WriteMode, decode_content
from kernelpool.notebooks.paths import check_file_path

TOOLS = Tools()


@TOOLS.add("read_file", "Read a file of your folder, a page at a time: text (UTF-8) as it is, other files as base64 "
           "(encoding='auto' decides; force one with 'utf-8' or 'base64'). `offset` is a byte offset: pass the "
           "result's next_offset to read on. Regular files only; at most max_chars characters per page.", READ)
async def read_file(call: Call, path: str, offset: int = 0, max_chars: int | None = None,
                    encoding: ReadEncoding = "auto") -> CallToolResult:
    s = call.services
    chars = max_chars if max_chars is not None else s.settings.max_output_chars
    page = await s.files.read(call.user, check_file_path(path), offset, chars, encoding)
    following = page.next_offset
    data = {"path": page.path, "size": page.size, "offset": page.offset, "length": page.length,
            "encoding": page.encoding, "content": page.text, "next_offset": following}
    extra = []
    text = page.text
    if following is not None:
        mime = mimetypes.guess_type(page.path)[0] or ("text/plain" if page.encoding == "utf-8" else "application/octet-stream")
        extra.append(ResourceLink(uri=f"{file_uri(page.path)}?offset={following}", name=f"{page.path} from byte {following}",
                                  mime_type=mime, size=page.size - following,
                                  description=f"the rest of {page.path}: {page.size - following} more bytes"))
        text += f"\n[bytes {page.offset}..{page.offset + page.length} of {page.size}; read on with offset={following}]"
    if page.encoding == "base64":
        text = f"[{page.length} bytes of {page.path} as base64]\n{text}"
    return result(text, data, extra)


@TOOLS.add("write_file", "Write a file in your folder: mode='create' (it must not exist), 'overwrite' (replaced "
           "atomically) or 'append' (adds to its end: send a large file in chunks). `content` is text, or base64 with "
           "encoding='base64'. At most max_file_bytes per call; refused, changing nothing, past your disk quota.", EDIT)
async def write_file(call: Call, path: str, content: str, encoding: WriteEncoding = "utf-8",
                     mode: WriteMode = "create") -> CallToolResult:
    checked = check_file_path(path)
    data = decode_content(content, encoding)
    done = await call.services.files.write(call.user, checked, data, mode)
    verb = {"create": "created", "overwrite": "created" if done.created else "replaced", "append": "appended to"}[mode]
    return result(f"{verb} {done.path}: {done.written} bytes written, {done.size} bytes now",
                  {"path": done.path, "mode": mode, "written": done.written, "size": done.size, "created": done.created})


@TOOLS.add("delete_file", "Delete a file (or a symbolic link, never its target) in your folder; not folders.", DESTRUCTIVE)
async def delete_file(call: Call, path: str) -> CallToolResult:
    checked = check_file_path(path)
    kind = await call.services.files.delete(call.user, checked)
    return result(f"deleted {checked}", {"path": checked, "deleted": kind})

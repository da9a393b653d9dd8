"""Uploads read with a ceiling: the body is counted as it arrives and reading stops at the limit.

FastAPI's `UploadFile` parameter would take the whole body (spooled to disk past 1 MB) before the
handler could look at its size, so a client could make every replica store gigabytes. Here the ASGI
receive channel itself is bounded: a declared Content-Length over the limit is refused unread, and
an undeclared or lying one is cut off once the bytes received pass it.
"""

from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import Message, Receive

from voxscale.inference.errors import ApiError

# Room for the multipart framing around the file: boundaries, part headers, a few small fields.
MULTIPART_OVERHEAD = 64 * 1024


class _TooLarge(Exception):
    pass


def _bounded(receive: Receive, limit: int) -> Receive:
    """`receive`, raising _TooLarge as soon as the body received passes `limit` bytes."""
    seen = 0

    async def bounded() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge
        return message

    return bounded


def _too_large(field: str, limit: int) -> ApiError:
    return ApiError(
        413,
        f"{field}: the upload is larger than the limit of {limit} bytes (VOXSCALE_MAX_UPLOAD_BYTES); "
        "send a shorter recording (3-30 s of speech, wav or flac)",
        field,
        "upload_too_large",
    )


def _missing(field: str, why: str) -> ApiError:
    return ApiError(
        422, f"{field}: {why}; send the recording as multipart/form-data in a file field named {field!r}", field
    )


async def read_file_field(request: Request, field: str, limit: int) -> bytes:
    """The bytes of the multipart file field `field`, at most `limit` of them, or a 413/422 naming it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
        raise _too_large(field, limit)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise _missing(field, "not a multipart/form-data request")
    bounded = Request(request.scope, _bounded(request.receive, limit + MULTIPART_OVERHEAD))
    try:
        async with bounded.form(max_files=1, max_fields=16) as form:
            upload = form.get(field)
            if not isinstance(upload, UploadFile):
                raise _missing(field, "Field required")
            data = await upload.read(limit + 1)
    except _TooLarge:
        raise _too_large(field, limit) from None
    except (HTTPException, MultiPartException) as exc:
        raise _missing(field, f"unreadable multipart body ({getattr(exc, 'detail', exc)})") from None
    if len(data) > limit:
        raise _too_large(field, limit)
    return data

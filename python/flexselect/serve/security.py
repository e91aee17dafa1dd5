"""What a request may touch: the listen address, the API key, the media folders, and uploads.

Every video a request names is resolved here to a real file inside one of the `--media-dir` folders (or the private
upload folder) after following symlinks, so `..`, absolute paths elsewhere and links pointing out all fail the same
way. Uploads stream into a private folder under a temporary name, are cut off at the size limit, and are renamed into
place only when complete; the folder is removed when the server stops.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from starlette.concurrency import run_in_threadpool

from ..errors import FlexSelectError

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")
UPLOAD_SCHEME = "upload:"


class Refused(Exception):
    """A request that names something it may not have, or that is too large: (status, message, code)."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(host: str, api_key: str | None) -> None:
    """Anything but loopback is reachable by others: refuse to start without a key there."""
    if not is_loopback(host) and not api_key:
        raise FlexSelectError(
            f"--host {host} makes the server reachable from other machines: also pass --api-key KEY "
            "(clients then send 'Authorization: Bearer KEY'), or keep the default --host 127.0.0.1"
        )


def key_matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class Media:
    """The folders videos may come from, and the private upload folder."""

    def __init__(self, roots: list[str | os.PathLike], max_upload_bytes: int, max_uploads: int = 16) -> None:
        self.roots = []
        for root in roots:
            path = Path(root).expanduser()
            if not path.is_dir():
                raise FlexSelectError(f"--media-dir {root} is not a folder; pass a folder that holds your videos")
            self.roots.append(path.resolve())
        self.max_upload_bytes = max_upload_bytes
        self.max_uploads = max_uploads
        self.uploads = Path(tempfile.mkdtemp(prefix="flexselect-uploads-"))  # mode 0700: private to this user

    def close(self) -> None:
        shutil.rmtree(self.uploads, ignore_errors=True)

    # -- naming videos ---------------------------------------------------------------------------------------------
    def list_videos(self) -> list[dict]:
        """Videos in the media folders (recursively, links that stay inside included), as names requests can use."""
        found = []
        for root in self.roots:
            for path in sorted(root.rglob("*")):
                if path.suffix.lower() not in VIDEO_SUFFIXES or not path.is_file():
                    continue
                try:
                    name = self.name_of(path)
                except Refused:
                    continue  # a symlink that points out of the folder
                found.append({"name": name, "size": path.stat().st_size})
        return found

    def name_of(self, path: Path) -> str:
        """The name a request uses for a file in the first root: its relative path ('root:i/...' for other roots)."""
        real = path.resolve()
        for i, root in enumerate(self.roots):
            if real.is_relative_to(root):
                rel = path.relative_to(root) if path.is_relative_to(root) else real.relative_to(root)
                return rel.as_posix() if i == 0 else f"root{i}/{rel.as_posix()}"
        raise Refused(403, f"{path} is outside the media folders", "media_forbidden")

    def resolve(self, url: str, param: str = "video_url") -> Path:
        """A request's video reference -> a real file inside the allowed folders, or `Refused`.

        Accepted: a name relative to the first media folder (as `GET /v1/flexselect/media` lists them), `rootN/...`
        for the other folders, an absolute path or `file://` URL inside a media folder, `upload:ID` from
        `POST /v1/flexselect/uploads`. Other URL schemes (http, https, ...) are refused: the server never downloads.
        """
        if not isinstance(url, str) or not url.strip():
            raise Refused(400, "the video part has no url", "invalid_video", param)
        url = url.strip()
        if url.startswith(UPLOAD_SCHEME):
            name = url[len(UPLOAD_SCHEME) :]
            path = self.uploads / name
            if "/" in name or "\\" in name or name.startswith(".") or not path.is_file():
                raise Refused(
                    404, f"no upload {name!r} (uploads are kept only while the server runs)", "upload_not_found", param
                )
            return path
        parsed = urlparse(url)
        if parsed.scheme == "file":
            candidate = Path(unquote(parsed.path))
        elif parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive, not a scheme
            raise Refused(
                400,
                f"video URLs with scheme {parsed.scheme!r} are not accepted: name a file in the media "
                "folder, or upload the video first",
                "unsupported_url_scheme",
                param,
            )
        else:
            candidate = Path(url)
        if not candidate.is_absolute():
            parts = candidate.parts
            if ".." in parts:
                raise Refused(403, f"{url!r}: '..' is not allowed in video names", "media_forbidden", param)
            root = self.roots[0]
            if parts and parts[0].startswith("root") and parts[0][4:].isdigit():
                index = int(parts[0][4:])
                if not 0 < index < len(self.roots):
                    raise Refused(404, f"{url!r}: there is no media folder {parts[0]}", "video_not_found", param)
                root, candidate = self.roots[index], Path(*parts[1:])
            candidate = root / candidate
        real = Path(os.path.realpath(candidate))  # follows every link: the check below sees the true target
        if not any(real.is_relative_to(root) for root in self.roots):
            raise Refused(403, f"{url!r} is outside the media folders (links are followed)", "media_forbidden", param)
        if not real.is_file():
            raise Refused(404, f"video not found: {url!r}", "video_not_found", param)
        return real

    # -- uploads ---------------------------------------------------------------------------------------------------
    async def save_upload(self, chunks: AsyncIterator[bytes], filename: str, declared_size: int | None) -> str:
        """Stream an upload into the private folder; returns its `upload:ID` reference."""
        suffix = Path(filename or "").suffix.lower()
        if suffix not in VIDEO_SUFFIXES:
            suffix = ".mp4"  # the decoders sniff the container; the suffix only helps people reading the folder
        too_big = Refused(
            413,
            f"the upload is larger than the server's limit of {self.max_upload_bytes // 2**20} MiB "
            "(start the server with a larger --max-upload-mb)",
            "upload_too_large",
        )
        if declared_size is not None and declared_size > self.max_upload_bytes:
            raise too_big
        name = secrets.token_hex(8) + suffix
        partial = self.uploads / f".{name}.partial"
        size = 0
        try:
            with open(partial, "xb") as f:  # noqa: ASYNC230 (opening is instant; the writes go to a thread)
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise too_big
                    await run_in_threadpool(f.write, chunk)  # a slow disk must not stall other requests
            if size == 0:
                raise Refused(400, "the upload is empty (0 bytes)", "invalid_video")
            partial.replace(self.uploads / name)  # complete files only ever appear under their final name
        finally:
            partial.unlink(missing_ok=True)
        self._evict()
        return UPLOAD_SCHEME + name

    def save_data_url(self, url: str, param: str) -> str:
        """A `data:video/...;base64,...` URL (the way some clients inline a video) saved as an upload."""
        header, _, payload = url.partition(",")
        if not header.startswith("data:video/") or not header.endswith(";base64"):
            raise Refused(400, "a data: video URL must be data:video/<type>;base64,...", "invalid_video", param)
        if len(payload) * 3 // 4 > self.max_upload_bytes:
            raise Refused(
                413,
                f"the inline video is larger than the limit of {self.max_upload_bytes // 2**20} MiB",
                "upload_too_large",
                param,
            )
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise Refused(400, "the data: video URL is not valid base64", "invalid_video", param) from None
        name = secrets.token_hex(8) + ".mp4"
        partial = self.uploads / f".{name}.partial"
        try:
            partial.write_bytes(data)
            partial.replace(self.uploads / name)
        finally:
            partial.unlink(missing_ok=True)
        self._evict()
        return UPLOAD_SCHEME + name

    def _evict(self) -> None:
        """Keep the newest `max_uploads` uploads: a long-running server does not fill the disk."""
        files = sorted(
            (p for p in self.uploads.iterdir() if not p.name.startswith(".")), key=lambda p: p.stat().st_mtime_ns
        )
        for old in files[: max(0, len(files) - self.max_uploads)]:
            old.unlink(missing_ok=True)

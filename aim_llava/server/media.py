"""A request's media, from its text to the frames the model sees.

Validation (:func:`file_media`, :func:`inline_image`) looks at the request's text only: no file
is touched before the request is admitted. Then, in a media reader's thread, :meth:`MediaRoot.open`
walks the path one component at a time from the root's directory handle (``openat`` with
``O_PATH | O_NOFOLLOW``, one descriptor held at a time, at most :data:`MAX_PATH_DEPTH` directories
down, counted before the walk), resolving symbolic links itself and refusing any step out of the
root; the decoder reads the file it reached through that handle, so the check and the open are
one operation: a directory swapped for a link meanwhile reads nothing outside the root, and a
frame directory is listed through the same handle. A regular file with more than one hard link
is refused (a hard link may be a file from anywhere on the file system).

Media are decoded in a worker process (:mod:`aim_llava.server.decoding`) under
:class:`~aim_llava.video.MediaLimits`: video frames, and images taken as frames, are brought to
the model's input size as they are decoded; a single image is kept at its own size (the model
tiles it), at most ``max_image_pixels``. Images are decoded by Pillow for the formats of
:data:`~aim_llava.video.IMAGE_FORMATS` only, an inline image by the decoder of the type it
declares; videos by FFmpeg's container demuxers only.
"""

from __future__ import annotations

import base64
import binascii
import errno
import io
import logging
import os
import stat
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image

from aim_llava.errors import AimLlavaError
from aim_llava.server.errors import ApiError, bad, cut, shown
from aim_llava.video import ReadingTimeExceeded, VideoClip, VideoError, is_image_file, open_image_rgb

if TYPE_CHECKING:
    from aim_llava.pipeline import EncodedVisual

logger = logging.getLogger("aim_llava.serve")

MAX_LINKS = 40  # symbolic links one path may pass through (the kernel's own limit)
MAX_PATH_DEPTH = 128  # directories a media path may go down, its links followed
MAX_REFERENCE_CHARS = 4096  # of a media reference (Linux's PATH_MAX)
# the image types a data: URL may declare, with the one Pillow decoder that reads each
INLINE_IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP",
                      "image/gif": "GIF", "image/bmp": "BMP", "image/tiff": "TIFF"}


@dataclass(frozen=True)
class FileMedia:
    """A file a request names: the client's reference and the path it gives (relative to the
    media root, or absolute)."""

    reference: str
    path: str
    param: str


@dataclass(frozen=True)
class InlineImage:
    """A ``data:`` URL image: its base64 payload and the Pillow format its declared type names."""

    payload: str
    format: str
    param: str


@dataclass
class RequestMedia:
    """What a request shows: one video (a file or frame directory), or images (one image, or the
    frames of one video)."""

    video: FileMedia | None = None
    images: list[FileMedia | InlineImage] = field(default_factory=list)


def file_media(url: str, param: str) -> FileMedia:
    """A media reference (``file://`` URL or path) checked as text: of bounded length, a local
    path, no NUL (once unquoted)."""
    if len(url) > MAX_REFERENCE_CHARS:
        raise bad(f"a media reference may hold at most {MAX_REFERENCE_CHARS:,} characters, not {len(url):,}", param)
    try:
        parsed = urlparse(url)
    except ValueError as err:  # such as an unclosed [ of an IPv6 address
        raise bad(f"the media reference is not a valid URL or path ({cut(str(err))})", param) from None
    if parsed.scheme in ("http", "https", "ftp"):
        raise bad("remote media URLs are not fetched (the server is offline): give a file:// URL or a path under "
                  "the server's media root", param, "remote_media")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise bad("file:// URLs must name a local path", param)
        path = unquote(parsed.path)
    elif parsed.scheme and len(parsed.scheme) > 1:
        raise bad(f"unsupported media URL scheme {shown(parsed.scheme)}: use file:// URLs or paths", param)
    else:
        path = url
    if "\x00" in path:
        raise bad("a media path must not contain NUL characters", param)
    return FileMedia(url, path, param)


def inline_image(url: str, param: str, max_bytes: int) -> InlineImage:
    """A ``data:image/TYPE;base64,...`` URL of a known image type and acceptable size (decoded
    later, after admission)."""
    header, _, payload = url.partition(",")
    declared = header.removeprefix("data:").split(";")[0].strip().lower()
    if not header.startswith("data:image/") or ";base64" not in header:
        raise bad("data: URLs must be base64 images (data:image/...;base64,...)", param)
    if declared not in INLINE_IMAGE_TYPES:
        raise bad(f"inline images may be {', '.join(INLINE_IMAGE_TYPES)}, not {shown(declared)}", param,
                  "unsupported_image_type")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise ApiError(413, f"an inline image may hold at most {max_bytes >> 20} MiB", param, "too_large")
    return InlineImage(payload, INLINE_IMAGE_TYPES[declared], param)


def unusable(err: BaseException, param: str) -> ApiError:
    reason = getattr(err, "strerror", None) or ("it cannot be encoded as a file name" if isinstance(err, UnicodeError)
                                                else "it is not a valid file name")
    return bad(f"the media path cannot be used on this server ({reason})", param)


class OpenedMedia:
    """A file or directory reached under the media root, held open: ``path`` reads it through
    its handle (``/proc/self/fd/N``), whatever happens to its name meanwhile."""

    def __init__(self, handle: int, is_dir: bool):
        self.handle, self.is_dir = handle, is_dir
        self.path = f"/proc/self/fd/{handle}"

    def __enter__(self) -> OpenedMedia:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.handle)


class MediaRoot:
    """The only directory whose files requests may name, held open for the server's life.
    Absolute paths name it by its real path or by the path it was given as."""

    def __init__(self, path: Path):
        self.spellings = {os.path.realpath(path).rstrip("/"), os.path.abspath(path).rstrip("/")}
        self.handle = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.handle)

    def inside(self, absolute: str) -> str | None:
        """An absolute path as a path relative to the root, or None if it lies outside (a sibling
        whose name starts with the root's is outside)."""
        for root in self.spellings:
            if absolute == root:
                return "."
            if absolute.startswith(root + "/"):
                return absolute[len(root) + 1:]
        return None

    def open(self, media: FileMedia) -> OpenedMedia:
        """The regular file (of one link) or directory ``media`` names, reached without leaving the root."""
        outside = ApiError(403, "media outside the server's media root are not served", media.param,
                           "outside_media_root")
        path = self.inside(media.path) if media.path.startswith("/") else media.path
        if path is None:
            raise outside
        try:
            handle = self.walk(path, outside, media.param)
        except (OSError, ValueError) as err:  # ValueError: a NUL; UnicodeError, one of its kinds: a lone surrogate
            if getattr(err, "errno", None) in (errno.ENOENT, errno.ENOTDIR):
                raise ApiError(404, f"media file not found under the media root: {cut(media.reference)}",
                               media.param, "media_not_found") from None
            raise unusable(err, media.param) from None
        status = os.fstat(handle)
        if not (stat.S_ISREG(status.st_mode) or stat.S_ISDIR(status.st_mode)):
            os.close(handle)
            raise bad(f"{cut(media.reference)} is not a regular file or directory", media.param)
        if stat.S_ISREG(status.st_mode) and status.st_nlink > 1:
            os.close(handle)
            raise ApiError(403, f"{cut(media.reference)} has {status.st_nlink} hard links, and a hard link may be a "
                                "file from outside the media root: media files with several links are not served",
                           media.param, "hard_link")
        return OpenedMedia(handle, stat.S_ISDIR(status.st_mode))

    def walk(self, path: str, outside: ApiError, param: str) -> int:
        """An ``O_PATH`` handle of what ``path`` (relative) names, each component opened from its
        parent's handle without following links; a link is read and its target walked in turn.
        One handle is held at a time (two while a child is opened), whatever the depth: ``..``
        opens the kernel's parent and checks (by device and inode) that it is the directory the
        walk came down from, so a directory moved away meanwhile cannot lead out of the root. A
        name after a file (``clip.mp4/``, ``clip.mp4/.``) is ENOTDIR, as the kernel has it."""
        names = [name for name in path.split("/") if name not in ("", ".")]
        if len(names) > MAX_PATH_DEPTH:
            raise too_deep(param)
        root = os.fstat(self.handle)
        trail = [(root.st_dev, root.st_ino)]  # the directories from the root down to ``current``
        current, is_dir = os.dup(self.handle), True
        parts, links = deque(path.split("/")), 0
        try:
            while parts:
                name = parts.popleft()
                if name in ("", "."):
                    if not is_dir:
                        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
                    continue
                if name == "..":
                    if len(trail) == 1:
                        raise outside
                    parent = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=current)
                    os.close(current)
                    current, is_dir = parent, True
                    status = os.fstat(parent)
                    trail.pop()
                    if (status.st_dev, status.st_ino) != trail[-1]:
                        raise outside
                    continue
                handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
                status = os.fstat(handle)
                if stat.S_ISLNK(status.st_mode):
                    target = os.readlink("", dir_fd=handle)
                    os.close(handle)
                    links += 1
                    if links > MAX_LINKS:
                        raise bad("the media path cannot be used on this server (too many levels of symbolic links)",
                                  param)
                    if target.startswith("/"):
                        target = self.inside(target)
                        if target is None:
                            raise outside
                        os.close(current)
                        current, is_dir, trail = os.dup(self.handle), True, trail[:1]
                    parts.extendleft(reversed(target.split("/")))
                    continue
                os.close(current)
                current, is_dir = handle, stat.S_ISDIR(status.st_mode)
                trail.append((status.st_dev, status.st_ino))
                if len(trail) > MAX_PATH_DEPTH + 1:
                    raise too_deep(param)
            found, current = current, None
            return found
        finally:
            if current is not None:
                os.close(current)


def too_deep(param: str) -> ApiError:
    return bad(f"a media path may go down at most {MAX_PATH_DEPTH} directories", param, "path_too_deep")


def decode_inline(image: InlineImage, max_pixels: int) -> Image.Image:
    """An inline image's pixels, decoded only by the decoder of the type it declared."""
    try:
        raw = base64.b64decode(image.payload, validate=True)
    except (binascii.Error, ValueError):
        raise VideoError("an inline image is not valid base64") from None
    return open_image_rgb(io.BytesIO(raw), "an inline image", max_pixels, formats=(image.format,))


class ImageDecoder(Protocol):
    """What decodes a request's images (:class:`aim_llava.server.decoding.DecodingProcess`)."""

    def image(self, image: OpenedMedia | InlineImage, name: str, as_frame: bool) -> np.ndarray:
        """One image as [H, W, 3] uint8: at the model's input size if it is one of several frames."""


def read_image(image: FileMedia | InlineImage, root: MediaRoot, decoder: ImageDecoder,
               as_frame: bool) -> np.ndarray:
    """One image as [H, W, 3] uint8, decoded by ``decoder``: at the model's input size if it is
    one of several frames."""
    if isinstance(image, InlineImage):
        return decoder.image(image, "an inline image", as_frame)
    with root.open(image) as opened:
        if opened.is_dir:
            raise bad(f"{cut(image.reference)} is a directory, not an image", image.param)
        return decoder.image(opened, cut(image.reference), as_frame)


def image_clip(frames: list[np.ndarray]) -> VideoClip:
    """One image, or several taken as the frames of a video (one a second; frames that kept their
    own aspect ratio are brought to the first one's size)."""
    if len(frames) == 1:
        return VideoClip(frames[0][None], [0], [0.0], 0.0, 0.0, "image", is_image=True)
    height, width = frames[0].shape[:2]
    frames = [f if f.shape[:2] == (height, width) else np.asarray(Image.fromarray(f).resize((width, height),
                                                                                          Image.BICUBIC))
              for f in frames]
    return VideoClip(np.stack(frames), list(range(len(frames))), [float(i) for i in range(len(frames))],
                     float(len(frames)), 1.0, "frames", sampled_fps=1.0)


def read_media(media: RequestMedia, root: MediaRoot, load: Callable[[OpenedMedia], VideoClip | EncodedVisual],
               decoder: ImageDecoder) -> VideoClip | EncodedVisual:
    """The frames of a request's media. ``load(opened)`` samples a video or frame directory, or
    returns its encoded video from the model's reuse cache; images are decoded by ``decoder``
    (an image named as a video goes through the image path and its budget). A failure to decode
    is a 400 naming the media as the client did (a 504 at the deadline)."""
    video = media.video
    if video is not None and not is_image_file(video.path):  # the path opened, not the URL's query or fragment
        with root.open(video) as opened:
            return decoded(lambda: load(opened), video.param, {opened.path: cut(video.reference)})
    images = [video] if video is not None else media.images
    return image_clip([decoded(lambda image=image: read_image(image, root, decoder, len(images) > 1), image.param)
                       for image in images])


def decoded(read, param: str, names: dict[str, str] | None = None):
    """What ``read()`` decodes; its failures as a 400 whose message names media as the client did
    (``names``: the server's paths and the client's references), whatever the decoder raised."""
    try:
        return read()
    except (ApiError, MemoryError):
        raise
    except AimLlavaError as err:
        message = str(err)
        for path, reference in (names or {}).items():
            message = message.replace(path, reference)
        if isinstance(err, ReadingTimeExceeded):
            raise ApiError(504, message, param, "timeout") from None
        raise bad(message, param, "unreadable_media") from None
    except Exception as err:  # Pillow's and FFmpeg's decoders raise many types of their own
        logger.warning("a decoder failed: %r", err)
        raise bad(f"the media cannot be decoded ({type(err).__name__}: {cut(str(err))})", param,
                  "unreadable_media") from None

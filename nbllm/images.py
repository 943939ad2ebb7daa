"""Images in chat messages: what a user may give, and how it travels without its pixels.

A user gives an image as a PIL image, a numpy array (height × width [× channels], uint8), a
``pathlib.Path`` to an image file, or raw file bytes. :func:`as_image` turns any of them into a
:class:`ChatImage`: the image as RGB pixels and its **sha256** — of the decoded pixels, so the same
picture given as a file or as an array has the same hash.

Inside nbllm a message's content is either text or a list of *parts* in OpenAI's and transformers'
shape: ``{"type": "text", "text": ...}`` and ``{"type": "image", "sha256": ...}``. Parts carry only the
hash, so records, the run log, request identities and replay hold hashes, never pixels; the pixels
wait in a small in-memory store (:func:`remember` / :func:`recall`) until a loader needs them.

Pillow is imported only when an image is actually made or decoded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ImageError

KEEP = 64
"""How many images the in-memory store keeps (the oldest unused one goes first)."""


@dataclass(frozen=True)
class ChatImage:
    """An image of a chat message: RGB pixels (PNG-encoded) and the sha256 that names it in records."""

    png: bytes
    sha256: str
    width: int
    height: int

    def pil(self) -> Any:
        """The image as a PIL RGB image."""
        from PIL import Image

        with Image.open(io.BytesIO(self.png)) as img:
            return img.convert("RGB")

    def data_url(self) -> str:
        """The image as a ``data:image/png;base64,...`` URL (OpenAI's ``image_url`` form)."""
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    def part(self) -> dict[str, str]:
        """The message part that stands for it (its hash only)."""
        return {"type": "image", "sha256": self.sha256}

    def __repr__(self) -> str:
        return f"<ChatImage {self.width}x{self.height} sha256={self.sha256[:12]}>"


def is_image(value: Any) -> bool:
    """Whether ``value`` is something :func:`as_image` takes as an image (a PIL image, a numpy array,
    a ``Path``, a :class:`ChatImage`) rather than text. Plain strings are text, never paths."""
    if isinstance(value, (ChatImage, os.PathLike)):
        return True
    module = type(value).__module__ or ""
    return (module.startswith("PIL.") and hasattr(value, "convert")) or (
        module == "numpy" and type(value).__name__ == "ndarray")


def as_image(value: Any, name: str = "the image") -> ChatImage:
    """A :class:`ChatImage` from a PIL image, a numpy array, a path, file bytes or a ChatImage;
    anything unreadable raises :class:`~nbllm.errors.ImageError` in one line naming ``name``."""
    if isinstance(value, ChatImage):
        return value
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow comes with transformers
        raise ImageError("images need the pillow library, which is not installed", "pip install pillow") from None
    if isinstance(value, os.PathLike):
        path = Path(value).expanduser()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageError(f"{name}: there is no file {path}", "check the path") from None
        except OSError as exc:
            raise ImageError(f"{name}: cannot read {path}: {exc.strerror or exc}", "check the path") from None
        return _decoded(data, f"{name} ({path.name})")
    if isinstance(value, (bytes, bytearray)):
        return _decoded(bytes(value), name)
    if type(value).__module__ == "numpy" and type(value).__name__ == "ndarray":
        import numpy as np

        array = value
        if array.dtype != np.uint8:
            if np.issubdtype(array.dtype, np.floating) and array.size and 0.0 <= array.min() and array.max() <= 1.0:
                array = (array * 255).round()
            array = np.clip(array, 0, 255).astype(np.uint8)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or 0 in array.shape:
            raise ImageError(f"{name} is an array of shape {tuple(value.shape)}, not an image",
                             "give height x width, or height x width x 3 (RGB) or 4 (RGBA)")
        return _from_pil(Image.fromarray(array))
    if isinstance(value, Image.Image):
        return _from_pil(value)
    raise ImageError(f"{name} is {type(value).__name__}, not an image",
                     "give a PIL image, a numpy array or a pathlib.Path to an image file")


def _decoded(data: bytes, name: str) -> ChatImage:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _from_pil(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        why = "not an image file pillow can read" if isinstance(exc, UnidentifiedImageError) else f"damaged ({exc})"
        raise ImageError(f"{name} is {why}", "give a PNG, JPEG, GIF, WebP or BMP image that opens") from None


def _from_pil(img: Any) -> ChatImage:
    rgb = img.convert("RGB")
    digest = hashlib.sha256(f"RGB {rgb.width}x{rgb.height}\n".encode() + rgb.tobytes()).hexdigest()
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return remember(ChatImage(out.getvalue(), digest, rgb.width, rgb.height))


def from_data_url(url: str, name: str = "the image") -> ChatImage:
    """An image from a ``data:image/...;base64,`` URL (OpenAI's ``image_url``)."""
    head, _, payload = url.partition(",")
    if not head.startswith("data:image/") or ";base64" not in head:
        raise ImageError(f"{name} is not a data:image/...;base64 URL",
                         "send the image inline as data:image/png;base64,... (this server fetches no URLs)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{name}: the base64 data is damaged", "encode the image file again") from None
    return _decoded(data, name)


# -- the store of pixels, by hash ---------------------------------------------------------------------
_STORE: OrderedDict[str, ChatImage] = OrderedDict()
_STORE_LOCK = threading.Lock()


def remember(image: ChatImage) -> ChatImage:
    """Keep ``image``'s pixels for :func:`recall` (the :data:`KEEP` most recently used are kept)."""
    with _STORE_LOCK:
        _STORE[image.sha256] = image
        _STORE.move_to_end(image.sha256)
        while len(_STORE) > KEEP:
            _STORE.popitem(last=False)
    return image


def recall(sha256: str) -> ChatImage:
    """The image whose hash is ``sha256``; one that is no longer held raises :class:`ImageError`."""
    with _STORE_LOCK:
        image = _STORE.get(sha256)
        if image is not None:
            _STORE.move_to_end(sha256)
            return image
    raise ImageError(f"the image {sha256[:12]} is not held in memory any more (a loaded conversation keeps "
                     "only the hashes of its images)", "send the image again in a new message")


# -- message content ----------------------------------------------------------------------------------
def parts(values: Iterable[Any]) -> list[dict[str, str]]:
    """Message content parts from text pieces, images and parts, in order (adjacent text joined, empty
    text dropped): ``["What is in ", img, "?"]`` → a text part, an image part, a text part."""
    out: list[dict[str, str]] = []
    for i, value in enumerate(values, 1):
        if isinstance(value, Mapping):
            out.append(check_part(value, f"part {i}"))
        elif isinstance(value, str):
            if out and out[-1]["type"] == "text":
                out[-1] = {"type": "text", "text": out[-1]["text"] + value}
            elif value:
                out.append({"type": "text", "text": value})
        else:
            out.append(as_image(value, f"image {sum(p['type'] == 'image' for p in out) + 1}").part())
    return out


def content_text(content: str | Sequence[Mapping[str, Any]]) -> str:
    """The text of a message's content, images left out."""
    if isinstance(content, str):
        return content
    return "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")


def image_hashes(messages: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """The sha256 of every image in ``messages``, in order."""
    out: list[str] = []
    for m in messages or ():
        content = m.get("content")
        if not isinstance(content, str):
            out.extend(str(p["sha256"]) for p in content or () if p.get("type") == "image")
    return out


def check_part(part: Any, where: str) -> dict[str, str]:
    """One content part, checked: ``{"type": "text", "text"}`` or ``{"type": "image", "sha256"}``."""
    if isinstance(part, Mapping):
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            return {"type": "text", "text": part["text"]}
        if part.get("type") == "image" and isinstance(part.get("sha256"), str):
            return {"type": "image", "sha256": part["sha256"]}
    raise ImageError(f"{where} is not a content part", 'write {"type": "text", "text": ...} or '
                     '{"type": "image", "sha256": ...} (give pixels through nbllm.images.as_image)')


__all__ = [
    "KEEP", "ChatImage", "as_image", "check_part", "content_text", "from_data_url", "image_hashes", "is_image", "parts",
    "recall", "remember",
]

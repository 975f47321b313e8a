"""URIs and plain paths: their scheme, their local path, one spelling each, joining keys, unique names."""

from __future__ import annotations

import os
import re
import uuid
from urllib.parse import urlparse

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+\-.]*):")


def scheme_of(uri: str) -> str:
    """The URI's scheme, with plain paths and Windows drive letters counted as `file`."""
    if uri[:1] > " " and "\t" not in uri and "\r" not in uri and "\n" not in uri:
        # urlparse's own rule for a URI it would not clean first, without the rest of the parse:
        # this runs several times for every row of a catalog.
        found = _SCHEME.match(uri)
        scheme = found.group(1) if found else ""
    else:
        scheme = urlparse(uri).scheme
    if len(scheme) <= 1:
        return "file"
    return scheme.lower()


def local_path(uri: str) -> str:
    """The filesystem path of a `file://` URI or a plain path, `~` expanded as a shell would."""
    return os.path.expanduser(urlparse(uri).path if uri.startswith("file://") else uri)


def comparable_uri(uri: str) -> str:
    """One spelling per object, to tell whether two URIs name it: local paths made absolute."""
    if scheme_of(uri) == "file":
        return os.path.abspath(local_path(uri))
    return uri


def join_uri(prefix: str, key: str) -> str:
    """Join a prefix and a relative key with exactly one slash."""
    return f"{prefix.rstrip('/')}/{key.lstrip('/')}"


def unique_name(prefix: str) -> str:
    """A collision-free object name, for checkpoints written by concurrent workers."""
    return f"{prefix}-{uuid.uuid4().hex}"


def bucket_and_key(uri: str) -> tuple[str, str]:
    """An object store URI's bucket (or container) and key."""
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def listed_uri(uri: str) -> str:
    """An object store URI as its listing spells it: az:// for azure://, the key without a leading /."""
    scheme = urlparse(uri).scheme
    bucket, key = bucket_and_key(uri)
    return f"{'az' if scheme == 'azure' else scheme}://{bucket}/{key}"


def folder_of(key: str) -> str:
    """The listing prefix of the folder holding `key`: everything up to its last "/" ("" at the root)."""
    return key[: key.rfind("/") + 1]


def bucket_and_folder(prefix: str) -> tuple[str, str]:
    """The bucket of `prefix` and its folder as a listing prefix ("" at the root, else ending in "/")."""
    parsed = urlparse(prefix)
    folder = parsed.path.strip("/")
    return parsed.netloc, f"{folder}/" if folder else ""

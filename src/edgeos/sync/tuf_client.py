"""The node's TUF client: verified metadata and targets from the fleet's repository.

It wraps ``tuf.ngclient.Updater``, which does the checks of the TUF client workflow
(signature thresholds, version rollback, expiry, snapshot and target hashes), and fetches
through the node's own ``httpx.Client``, so every request presents the device's client
certificate and verifies the fleet by its CA. Every refusal comes out as
:class:`edgeos.errors.VerificationError` saying what was refused and why; a fleet that
does not answer is :class:`edgeos.errors.UnavailableError`.

Not thread-safe, and one client per metadata directory: ngclient keeps its trusted state
in files there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import FetcherInterface, Updater

from edgeos.errors import ConfigError, NotFoundError, UnavailableError, VerificationError

TUF_PREFIX = "/tuf"
"""Where the fleet serves its repository (metadata and targets below it)."""

# How much of a refusing fleet's answer goes into the error message.
_ERROR_BODY_LIMIT = 512

# What a refusal means, by the kind of check that failed.
_ROLE_IN_MESSAGE = re.compile(r"\b(root|timestamp|snapshot|targets)\b")
_FROZEN = "a freeze attack, or a fleet that stopped re-signing its metadata"
_ROOT_EXPIRED = "the fleet has to renew its root with the offline root keys"
_ROLLED_BACK = (
    "its version is older than one already trusted or is not the version the newer "
    "metadata lists (a rollback or mix-and-match attack)"
)
_FORGED = "it is not signed by a threshold of the keys the trusted root names (forged metadata)"


class HttpxFetcher(FetcherInterface):
    """ngclient's downloads over an ``httpx.Client`` the caller has configured (mTLS, CA).

    As ngclient requires: an answer other than 2xx is ``DownloadHTTPError`` with its
    status, a timeout is ``SlowRetrievalError``, any other transport failure
    ``DownloadError``, whether it happens before the body or while reading it.
    """

    def __init__(self, http: httpx.Client, *, chunk_size: int = 256 * 1024) -> None:
        self._http = http
        self._chunk_size = chunk_size
        self.last_url: str | None = None
        """The URL fetched last: the file a refusal that follows is most likely about."""
        self.last_metadata: bytes | None = None
        """The last body fetched with ``download_bytes`` (ngclient's way for metadata)."""

    def download_bytes(self, url: str, max_length: int) -> bytes:
        """ngclient's download of a metadata file, kept for the error a refusal makes."""
        self.last_metadata = None
        data = super().download_bytes(url, max_length)
        self.last_metadata = data
        return data

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.last_url = url
        try:
            response = self._http.send(self._http.build_request("GET", url), stream=True)
        except httpx.TimeoutException as exc:
            raise tuf_errors.SlowRetrievalError(f"GET {url} timed out: {exc}") from exc
        except httpx.HTTPError as exc:
            raise tuf_errors.DownloadError(f"GET {url} failed: {exc}") from exc
        if not response.is_success:
            try:
                detail = _error_detail(response)
            finally:
                response.close()
            raise tuf_errors.DownloadHTTPError(
                f"GET {url} answered HTTP {response.status_code}{detail}", response.status_code
            )
        return self._chunks(url, response)

    def _chunks(self, url: str, response: httpx.Response) -> Iterator[bytes]:
        # A generator, so the status is checked in _fetch, before ngclient iterates.
        try:
            yield from response.iter_bytes(self._chunk_size)
        except httpx.TimeoutException as exc:
            raise tuf_errors.SlowRetrievalError(f"GET {url} timed out: {exc}") from exc
        except (httpx.HTTPError, httpx.StreamError) as exc:
            raise tuf_errors.DownloadError(f"GET {url} broke off: {exc}") from exc
        finally:
            response.close()


def _error_detail(response: httpx.Response) -> str:
    try:
        body = response.read()[:_ERROR_BODY_LIMIT]
    except httpx.HTTPError:
        return ""
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    message = doc.get("message") if isinstance(doc, dict) else None
    return f": {message}" if isinstance(message, str) else ""


class TufClient:
    """Downloads and verifies targets from the fleet at ``base_url`` (``/tuf/...`` below it).

    ``bootstrap`` once with the root given at enrollment; then ``refresh`` and
    ``download``. Metadata is kept in ``metadata_dir``, verified targets in ``targets_dir``.
    """

    def __init__(
        self, metadata_dir: Path, targets_dir: Path, base_url: str, http: httpx.Client
    ) -> None:
        self._metadata_dir = metadata_dir
        self._targets_dir = targets_dir
        base = base_url.rstrip("/") + TUF_PREFIX
        self._metadata_url = f"{base}/metadata/"
        self._targets_url = f"{base}/targets/"
        self._fetcher = HttpxFetcher(http)
        self._updater: Updater | None = None

    @property
    def bootstrapped(self) -> bool:
        """Whether a trusted root is in place."""
        return (self._metadata_dir / "root.json").is_file()

    def bootstrap(self, trusted_root: bytes) -> bool:
        """Trust ``trusted_root`` unless a root is trusted already; True when it was written.

        A root in place stays: it may be newer, reached through the TUF chain, and only
        that chain may replace it. The given root must be signed by its own threshold.
        """
        if self.bootstrapped:
            return False
        self._metadata_dir.mkdir(parents=True, exist_ok=True)
        with self._refusals("the enrollment root"):
            # The Updater verifies the root against itself and persists it as ngclient
            # expects to find it (root_history/N.root.json, linked as root.json).
            self._new_updater(bootstrap=trusted_root)
        return True

    def refresh(self) -> None:
        """Fetch and verify the newest root, timestamp, snapshot and targets."""
        if not self.bootstrapped:
            raise ConfigError("no trusted TUF root: the node has to enroll first")
        with self._refusals("the trusted root"):
            updater = self._new_updater(bootstrap=None)
        with self._refusals("the fleet's metadata"):
            updater.refresh()
        self._updater = updater

    def info(self, target_path: str) -> dict[str, Any]:
        """The custom metadata of a signed target (``kind``, ``name``, ``version``)."""
        custom = self._target(target_path).custom
        return dict(custom) if isinstance(custom, dict) else {}

    def download(self, target_path: str) -> bytes:
        """A signed target's bytes: from ``targets_dir`` when valid there, else fetched.

        The bytes returned are the ones checked against the signed length and hash.
        """
        target = self._target(target_path)
        path = self._download(target)
        data = path.read_bytes()
        with self._refusals(f"target {target_path}"):
            target.verify_length_and_hashes(data)
        return data

    def download_file(self, target_path: str) -> Path:
        """Like :meth:`download`, for large targets: the verified file in ``targets_dir``."""
        return self._download(self._target(target_path))

    def _download(self, target: TargetFile) -> Path:
        updater = self._refreshed()
        self._targets_dir.mkdir(parents=True, exist_ok=True)
        with self._refusals(f"target {target.path}"):
            cached = updater.find_cached_target(target)
            if cached is not None:
                return Path(cached)
            return Path(updater.download_target(target))

    def _target(self, target_path: str) -> TargetFile:
        updater = self._refreshed()
        with self._refusals("the fleet's metadata"):
            target = updater.get_targetinfo(target_path)
        if target is None:
            raise NotFoundError(f"{target_path} is not a target in the fleet's signed metadata")
        return target

    def _refreshed(self) -> Updater:
        if self._updater is None:
            self.refresh()
        if self._updater is None:
            raise AssertionError("refresh() left no updater")
        return self._updater

    def _new_updater(self, *, bootstrap: bytes | None) -> Updater:
        return Updater(
            metadata_dir=str(self._metadata_dir),
            metadata_base_url=self._metadata_url,
            target_dir=str(self._targets_dir),
            target_base_url=self._targets_url,
            fetcher=self._fetcher,
            bootstrap=bootstrap,
        )

    @contextmanager
    def _refusals(self, what: str) -> Iterator[None]:
        """Translate tuf's exceptions into edgeos errors naming what was refused and why."""
        try:
            yield
        except tuf_errors.DownloadLengthMismatchError as exc:
            # Longer than its signed length: tampered, not a network failure.
            raise VerificationError(
                f"TUF refused {self._subject(what, exc)}: {_mismatch(what)} ({exc})"
            ) from exc
        except tuf_errors.DownloadError as exc:
            raise UnavailableError(f"TUF could not fetch {what}: {exc}") from exc
        except tuf_errors.RepositoryError as exc:
            raise VerificationError(
                f"TUF refused {self._subject(what, exc)}: {self._reason(what, exc)} ({exc})"
            ) from exc

    def _subject(self, what: str, exc: Exception) -> str:
        if what.startswith("target "):
            return what
        named = _ROLE_IN_MESSAGE.search(str(exc))
        if named is not None:
            return named.group(1)
        last = self._fetcher.last_url
        return last.rsplit("/", 1)[-1] if last else what

    def _reason(self, what: str, exc: tuf_errors.RepositoryError) -> str:
        if isinstance(exc, tuf_errors.ExpiredMetadataError):
            cause = _ROOT_EXPIRED if "root" in str(exc) else _FROZEN
            return f"it has expired{self._expired_at(exc)} ({cause})"
        if isinstance(exc, tuf_errors.BadVersionNumberError):
            return _ROLLED_BACK
        if isinstance(exc, tuf_errors.UnsignedMetadataError):
            return _FORGED
        if isinstance(exc, tuf_errors.LengthOrHashMismatchError):
            return _mismatch(what)
        return "it does not verify"

    def _expired_at(self, exc: tuf_errors.ExpiredMetadataError) -> str:
        # ngclient names the role but not the time. An expired root is the trusted one,
        # kept locally; any other expired role is the file just fetched.
        named = _ROLE_IN_MESSAGE.search(str(exc))
        role = named.group(1) if named is not None else None
        try:
            if role == Root.type:
                data: bytes | None = (self._metadata_dir / "root.json").read_bytes()
            else:
                data = self._fetcher.last_metadata
            if data is None:
                return ""
            signed = Metadata.from_bytes(data).signed
        except (OSError, tuf_errors.RepositoryError):
            return ""
        return f" at {signed.expires.isoformat()}" if signed.type == role else ""


def _mismatch(what: str) -> str:
    if what.startswith("target "):
        return (
            "its length or hash differs from the signed targets metadata (tampered in the "
            "fleet's store or in transit)"
        )
    return (
        "its length or hash differs from what the newer signed metadata lists (a "
        "mix-and-match attack, or tampered in the fleet's store or in transit)"
    )

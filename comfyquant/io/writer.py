"""Streaming, atomic safetensors writer: header first (offsets from the planned specs), then tensors in order.

Data goes to ``<out>.tmp-<pid>`` next to the target, is fsynced and renamed over the target only when every
planned tensor was written. Any exception, Ctrl-C or SIGTERM removes the temporary file, so a failed run
leaves nothing behind. OS write failures become one-line ``UserError`` messages.
"""

from __future__ import annotations

import errno
import json
import math
import os
import queue
import signal
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

import torch

from comfyquant.errors import UserError
from comfyquant.io.reader import DTYPE_NAMES, dtype_size


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor as the header will describe it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)


def build_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None, size: int | None = None) -> bytes:
    """The 8-byte length prefix plus the JSON header, space-padded to a multiple of 8 bytes (or to ``size``
    bytes in all, for a header written into space reserved before the data; ValueError if it does not fit)."""
    obj: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"safetensors metadata must map str to str, got {bad[0]!r}")
        obj["__metadata__"] = dict(metadata)
    pos = 0
    for s in specs:
        if s.name in obj:
            raise ValueError(f"duplicate tensor name '{s.name}' in output specs")
        if s.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype {s.dtype} of '{s.name}' cannot be stored in safetensors")
        obj[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        pos += s.nbytes
    raw = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    if size is not None:
        if len(raw) + 8 > size:
            raise ValueError(f"header of {len(raw) + 8} bytes does not fit the {size} bytes reserved")
        raw += b" " * (size - 8 - len(raw))
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def header_reserve(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> int:
    """Bytes to reserve for the header of a file whose tensors may still change while it is written.

    Room for the planned header plus 96 bytes per tensor: a layer that falls back to high precision has fewer
    entries (weight instead of weight + scales + comfy_quant), and its offsets gain at most a few digits.
    """
    size = len(build_header(specs, metadata)) + 96 * len(specs) + 4096
    return size + (-size % 8)


def temp_path_for(path: Path) -> Path:
    """The temporary file a write to ``path`` goes through."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def os_error_message(err: OSError, path: Path) -> str:
    """A one-line message for a failed write."""
    code = err.errno
    if code == errno.ENOSPC:
        return f"no space left on device writing {path}"
    if code == errno.EDQUOT:
        return f"disk quota exceeded writing {path}"
    if code == errno.EFBIG:
        return f"file too large (file system or process size limit) writing {path}"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied writing {path}"
    if code == errno.EROFS:
        return f"read-only file system: cannot write {path}"
    if code == errno.ENOENT:
        return f"directory does not exist: cannot write {path}"
    return f"cannot write {path}: {err.strerror or err}"


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"terminated by signal {signum}")


class StreamingWriter:
    """Write ``specs`` to ``path``: use as a context manager, call :meth:`write` once per spec in order.

    The target is replaced only on a clean exit of the ``with`` block after all tensors were written. With
    ``background=True`` the bytes go to disk on a worker thread (at most ``QUEUE_DEPTH`` tensors in flight),
    so the caller quantizes the next tensor while the last one is written; a write error surfaces at the next
    :meth:`write` or at the end of the block.
    """

    QUEUE_DEPTH = 2

    def __init__(self, path: str | Path, specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None,
                 *, overwrite: bool = False, background: bool = False, amendable: bool = False) -> None:
        self.path = Path(path)
        self.specs = list(specs)
        # amendable: ``specs`` is the plan, but each layer may still change its tensors while streaming (a layer
        # that falls back to high precision); the header is written last, into space reserved before the data.
        self.amendable = amendable
        self._reserve = header_reserve(self.specs, metadata) if amendable else 0
        self._written: list[TensorSpec] = []
        self._written_names: set[str] = set()
        self.metadata = dict(metadata or {})
        self.overwrite = overwrite
        self.tmp = temp_path_for(self.path)
        self._next = 0
        self._file: object = None
        self._old_term: object = None
        self.bytes_written = 0
        self.background = background
        self._queue: queue.Queue[memoryview | None] = queue.Queue(maxsize=self.QUEUE_DEPTH)
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._created = False  # the temporary file exists and is ours to delete

    # -- context management -------------------------------------------------------------------------------
    def __enter__(self) -> StreamingWriter:
        if self.path.exists() and not self.overwrite:
            raise UserError(f"output exists: {self.path} (use --force to overwrite)")
        header = b"" if self.amendable else build_header(self.specs, self.metadata)
        self._install_sigterm()
        try:
            self._file = open(self.tmp, "wb", buffering=0)  # closed in finish() or abort()
            self._created = True
            if self.amendable:
                self._file.seek(self._reserve)  # type: ignore[attr-defined]
            self._write_all(header)
            if self.background:
                self._worker = threading.Thread(target=self._drain, name="comfyquant-writer", daemon=True)
                self._worker.start()
        except BaseException as e:
            err = UserError(os_error_message(e, self.path)) if isinstance(e, OSError) else e
            self._abort_after(err)
            if err is e:
                raise
            raise err from None
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if ev is not None:
            self._abort_after(ev)
            return
        try:
            self.finish()
        except BaseException as e:
            self._abort_after(e)
            raise

    def _abort_after(self, err: BaseException) -> None:
        """Abort because of ``err``; a temporary file that cannot be removed is added to a UserError's message
        (still one line), else noted on ``err``: the first error is what the user must see, never masked."""
        left = self.abort()
        if left is None:
            return
        if isinstance(err, UserError):
            raise type(err)(f"{err}; {left}") from None
        err.add_note(left)

    # -- writing ----------------------------------------------------------------------------------------------
    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; its name, dtype and shape must match the next spec (in amendable mode: any
        tensor not written yet, in the order it should appear)."""
        if self._file is None:
            raise RuntimeError("StreamingWriter.write outside of its 'with' block")
        if self.amendable:
            spec = TensorSpec(name, tensor.dtype, tuple(tensor.shape))
            if name in self._written_names:
                raise ValueError(f"tensor '{name}' written twice")
            self._written.append(spec)
            self._written_names.add(name)
        else:
            if self._next >= len(self.specs):
                raise ValueError(f"tensor '{name}' written after all {len(self.specs)} planned tensors")
            spec = self.specs[self._next]
            if name != spec.name:
                raise ValueError(f"expected tensor '{spec.name}' next, got '{name}'")
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise ValueError(f"tensor '{name}' is {tensor.dtype} {tuple(tensor.shape)}, "
                                 f"planned {spec.dtype} {spec.shape}")
        if spec.nbytes:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            if data.nbytes != spec.nbytes:  # pragma: no cover - dtype/shape already checked
                raise ValueError(f"tensor '{name}' has {data.nbytes} bytes, planned {spec.nbytes}")
            self._emit(data)
        self._next += 1

    def write_parts(self, name: str, parts: Iterable[torch.Tensor]) -> None:
        """Write the next planned tensor from consecutive pieces (e.g. row chunks of a tensor too large to hold
        whole); the pieces' dtype must be the spec's and their bytes must add up to it exactly."""
        if self._file is None or self.amendable:
            raise RuntimeError("StreamingWriter.write_parts needs an open writer with planned specs")
        if self._next >= len(self.specs) or self.specs[self._next].name != name:
            raise ValueError(f"tensor '{name}' is not the next planned tensor")
        spec, total = self.specs[self._next], 0
        for part in parts:
            if part.dtype != spec.dtype:
                raise ValueError(f"a part of '{name}' is {part.dtype}, planned {spec.dtype}")
            data = part.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            total += data.nbytes
            if total > spec.nbytes:
                raise ValueError(f"parts of '{name}' exceed its planned {spec.nbytes} bytes")
            if data.nbytes:
                self._emit(data)
        if total != spec.nbytes:
            raise ValueError(f"parts of '{name}' hold {total} bytes, planned {spec.nbytes}")
        self._next += 1

    def _emit(self, data: object) -> None:
        """Hand bytes to the file, directly or through the worker thread."""
        if self._worker is None:
            self._write_all(memoryview(data))  # type: ignore[arg-type]
        else:
            self._raise_worker_error()
            self._queue.put(memoryview(data))  # type: ignore[arg-type]  # the view keeps the array alive

    def _drain(self) -> None:
        """Worker thread: write queued buffers in order until the end marker.

        After the first error (kept for the main thread) or an abort it goes on taking buffers off the queue
        without writing them, until the end marker: a worker that returned early would leave the main thread
        blocked forever in ``put`` on the full queue (a full disk used to hang the converter that way).
        """
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None or self._stop.is_set():
                continue
            try:
                self._write_all(item)
            except BaseException as e:  # handed to the main thread by _raise_worker_error
                self._error = e

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _join_worker(self, *, stop: bool) -> None:
        """End the worker: after the queued writes (``stop=False``) or as soon as possible (``stop=True``)."""
        worker, self._worker = self._worker, None
        if worker is None:
            return
        if stop:
            self._stop.set()
            while True:  # drop what is queued: the worker would only skip it
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
        self._queue.put(None)  # never blocks for good: the worker keeps taking items until this marker
        worker.join()

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        try:
            while view:
                n = self._file.write(view)  # type: ignore[attr-defined]
                if not n:
                    raise OSError(errno.EIO, "write returned 0")
                self.bytes_written += n
                view = view[n:]
        except OSError as e:
            raise UserError(os_error_message(e, self.path)) from None

    def finish(self) -> None:
        """Check completeness, fsync, rename over the target."""
        if not self.amendable and self._next != len(self.specs):
            raise ValueError(f"only {self._next} of {len(self.specs)} planned tensors were written "
                             f"(next: '{self.specs[self._next].name}')")
        self._join_worker(stop=False)
        self._raise_worker_error()
        if self.amendable:
            header = build_header(self._written, self.metadata, size=self._reserve)
            self._file.seek(0)  # type: ignore[attr-defined]
            self._write_all(header)
        f, self._file = self._file, None
        try:
            os.fsync(f.fileno())  # type: ignore[attr-defined]
            f.close()  # type: ignore[attr-defined]
            if self.path.exists() and not self.overwrite:
                raise UserError(f"output exists: {self.path} (use --force to overwrite)")
            os.replace(self.tmp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as e:
            raise UserError(os_error_message(e, self.path)) from None
        finally:
            self._restore_sigterm()

    def abort(self) -> str | None:
        """Close and delete the temporary file (idempotent). Returns None, or why the temporary file could not
        be deleted (the caller is already handling an error and must not lose it to a second one)."""
        self._join_worker(stop=True)
        f, self._file = self._file, None
        try:
            if f is not None:
                f.close()  # type: ignore[attr-defined]
        except OSError:
            pass  # the file is being deleted; a failed close of a doomed temp file changes nothing
        finally:
            self._restore_sigterm()
        return self._remove_temp()

    def _remove_temp(self) -> str | None:
        # Only a file this writer created: unlink() of a name that was never created still fails with EROFS on
        # a read-only file system, and that second error used to replace the first one (a double traceback).
        if not self._created:
            return None
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError as e:
            return f"the temporary file {self.tmp} could not be removed: {e.strerror or e}"
        self._created = False
        return None

    # -- signals ----------------------------------------------------------------------------------------------
    def _install_sigterm(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._old_term = signal.signal(signal.SIGTERM, _raise_interrupt)

    def _restore_sigterm(self) -> None:
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)  # type: ignore[arg-type]
            self._old_term = None


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return  # some file systems do not allow opening directories; the rename itself already happened
    try:
        os.fsync(fd)
    except OSError:
        pass  # directory fsync is best effort (not supported everywhere); the data file itself was fsynced
    finally:
        os.close(fd)


def save_file(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
              *, overwrite: bool = False) -> None:
    """Write a dict of tensors in one go through :class:`StreamingWriter` (for small files and tests)."""
    specs = [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    with StreamingWriter(path, specs, metadata, overwrite=overwrite) as w:
        for k, t in tensors.items():
            w.write(k, t)


def write_small_file(path: str | Path, data: bytes | str) -> None:
    """Write a small non-tensor output (JSON report, layer-config template, PNG) the way tensors are written:
    a temporary file next to it, fsync, rename. OS errors become one-line ``UserError`` messages, and the
    temporary file is removed only if it was created (so a read-only folder reports EROFS once)."""
    path = Path(path)
    tmp = temp_path_for(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    created = False
    try:
        with open(tmp, "wb") as f:
            created = True
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        msg = os_error_message(e, path) if isinstance(e, OSError) else None
        if created:
            try:
                tmp.unlink(missing_ok=True)
            except OSError as e2:
                left = f"the temporary file {tmp} could not be removed: {e2.strerror or e2}"
                if msg is None:
                    e.add_note(left)
                msg = msg and f"{msg}; {left}"
        if msg is None:
            raise
        raise UserError(msg) from None

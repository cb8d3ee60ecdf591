"""The Ray engine (`--engine ray`): the local engine's read -> decode -> preprocess -> model pipeline on Ray Data, CPU
tasks decoding and actors holding the model, results streamed back to the driver in input order. The only module that
imports ray. Texts (labels) are encoded on the driver; the embedding index is neither read nor written."""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import pyarrow as pa
import ray
import ray.data
from PIL import Image

from clipcli.errors import ClipError, InputError, OptionError, UsageError, one_line, os_reason
from clipcli.inputs import Failure
from clipcli.pipeline import FeatureBatch, Progress, Session, Settings, default_workers
from clipcli.preprocess import PreprocessConfig, decode_image, preprocess, read_image_file

if TYPE_CHECKING:
    from clipcli.config import CLIPConfig
    from clipcli.loader import Clip
    from clipcli.tokenizer import ClipTokenizer

MAX_BLOCK_ROWS = 1024  # paths per input block: one decode task's share (see block_rows)
_QUIET = logging.CRITICAL + 1  # above every level: Ray's own console loggers print nothing


@dataclass(frozen=True)
class Cluster:
    """What a run may use of a Ray cluster: its CPUs and GPUs in all, and the CPUs of each node that has some."""

    cpus: float
    gpus: float
    node_cpus: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    """How a run uses a cluster: the model actors' torch device and precision, how many there are and what each
    reserves, the torch threads of a CPU actor (None: torch's default), and the CPUs and threads of a decode task."""

    device: str  # "cuda" or "cpu"
    precision: str  # fp32, fp16 or bf16
    actors: int
    actor_cpus: float
    actor_gpus: float
    threads: int | None
    decode_cpus: float
    decode_threads: int


def plan_for(cluster: Cluster, device: str, dtype: str) -> Plan:
    """The plan for `--device` and `--dtype` on `cluster`; UsageError for a device the cluster does not have.

    With GPUs (and a device that allows them): one actor per GPU, holding one CPU to feed it, and decode tasks of
    one CPU each on all the other CPUs, decoding while the GPUs compute.

    CPU only: actors as large as the smallest node (all its cores), as many as fit, and decode tasks of the same
    size, which Ray Data therefore fuses into the actors: each actor decodes a batch on all its cores, then runs
    the model on all of them, as the local engine does on CPU, where taking turns measured faster than decoding
    beside the model's threads (benchmarks/README.md, "Design choices"); decode tasks beside CPU actors would
    share the cores with the model in just that way."""
    if not (device in ("auto", "cpu") or device.startswith("cuda")):
        raise OptionError("device", device, "is not available on a Ray cluster", "use {option} auto, cpu or cuda")
    gpus = int(cluster.gpus)
    if device == "cpu" or (device == "auto" and gpus == 0):
        import torch

        from clipcli.loader import DTYPE_NAMES, resolve_dtype

        chosen = resolve_dtype(dtype, torch.device("cpu"))  # the driver's torch speaks for CPU workers
        precision = next(name for name, value in DTYPE_NAMES.items() if value == chosen)
        nodes = [cpus for cpus in cluster.node_cpus if cpus >= 1] or [1]
        size = min(nodes)
        return Plan("cpu", precision, actors=sum(cpus // size for cpus in nodes), actor_cpus=size, actor_gpus=0,
                    threads=size, decode_cpus=size, decode_threads=size)
    if gpus == 0:
        raise OptionError("device", device, "the Ray cluster has no GPU", "use {option} cpu or auto")
    precision = "fp16" if dtype == "auto" else dtype  # as loader.resolve_dtype on CUDA
    # Each actor sees its one GPU as cuda (Ray sets CUDA_VISIBLE_DEVICES), whatever cuda:N was asked for.
    return Plan("cuda", precision, actors=gpus, actor_cpus=1, actor_gpus=1, threads=None, decode_cpus=1,
                decode_threads=1)


def block_rows(images: int, cpus: float, batch_size: int) -> int:
    """Paths per input block (one decode task each): whole batches, about four blocks per CPU so that every CPU has
    work while the model runs, and at most MAX_BLOCK_ROWS rows (or one batch, if larger)."""
    per_cpu = math.ceil(images / max(4 * cpus, 1))
    batches = max(1, math.ceil(per_cpu / batch_size))
    return max(batch_size, min(batches * batch_size, MAX_BLOCK_ROWS))


# ---------------------------------------------------------------------------------------------- on the workers


def decode_batch(batch: dict[str, np.ndarray], config: PreprocessConfig, draft: int | None,
                 max_pixels: int | None, threads: int = 1) -> dict[str, np.ndarray]:
    """A decode task: `path` (bytes) -> (B, 3, H, W) float32 `pixels` as the local engine makes them (read_image_file,
    decode_image, preprocess) and each row's failure reason in `error` (b"" when it decoded); `index` passes through.

    `max_pixels` is the driver's Pillow decompression-bomb limit (--max-megapixels), process-wide here too.
    `threads` decode at once (Pillow releases the GIL while decoding and resizing)."""
    _worker_settings()
    Image.MAX_IMAGE_PIXELS = max_pixels
    paths = [os.fsdecode(bytes(path)) for path in batch["path"]]
    height, width = config.output_size or (0, 0)  # fixed for every model (loader.read_preprocess checks it)
    pixels = np.zeros((len(paths), 3, height, width), dtype=np.float32)

    def decode(row: int) -> bytes:
        try:
            pixels[row] = preprocess(decode_image(read_image_file(paths[row]), draft), config)
        except InputError as err:
            return str(err).encode("utf-8", "surrogateescape")
        return b""

    if threads > 1 and len(paths) > 1:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="clip-decode") as pool:
            errors = list(pool.map(decode, range(len(paths))))
    else:
        errors = [decode(row) for row in range(len(paths))]
    return {"index": batch["index"], "pixels": pixels, "error": np.array(errors, dtype=object)}


def _worker_settings() -> None:
    """The process-wide settings the CLI makes for the local engine, made in a Ray worker, which runs this job's
    tasks only: glibc keeps freed memory for the next batch (process.keep_freed_memory; 4-16% faster end to end on
    CPU, benchmarks/README.md)."""
    from clipcli.process import keep_freed_memory

    keep_freed_memory()


@dataclass(frozen=True)
class ModelPayload:
    """The driver's loaded model, as the workers get it: its float32 state dict (transformers' names) in the object
    store, put there once, so that no worker needs the model's files, a Hub download or the driver's paths; and the
    config, tokenizer and preprocessing that go with it."""

    config: CLIPConfig
    state: Any  # ray.ObjectRef of {name: float32 array}, or the dict itself
    tokenizer: ClipTokenizer
    preprocess: PreprocessConfig
    source: str
    weights_dtype: str

    @classmethod
    def put(cls, clip: Clip) -> ModelPayload:
        """The payload of a loaded float32 CPU model (the driver's), its weights put in the object store."""
        state = {name: tensor.numpy() for name, tensor in clip.model.state_dict().items()}
        return cls(clip.config, ray.put(state), clip.tokenizer, clip.preprocess, clip.source, clip.weights_dtype)

    def load(self, device: str, dtype: str) -> Clip:
        """The model on `device` in `dtype` (loader.resolve_device / resolve_dtype / place_model, as load_files)."""
        import torch

        from clipcli.loader import Clip, place_model, resolve_device, resolve_dtype
        from clipcli.weights import build_model

        state = self.state if isinstance(self.state, dict) else ray.get(self.state)
        target = resolve_device(device)
        chosen = resolve_dtype(dtype, target)
        with warnings.catch_warnings():
            # The object store's arrays are read-only, and the model only reads them: a CPU actor in float32 computes
            # straight from the one copy that every actor on its node shares (other devices and dtypes copy).
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensors = {name: torch.from_numpy(array) for name, array in state.items()}
        model = build_model(self.config, tensors)
        return Clip(place_model(model, target, chosen), self.tokenizer, self.preprocess, self.source, chosen,
                    weights_dtype=self.weights_dtype)


class ImageTower:
    """A model actor: holds the model and turns decoded `pixels` into (B, D) float32 raw `features` (zero rows where
    decoding failed); `index` and `error` pass through; `fatal` says why the model did not load (b"" when it did)."""

    def __init__(self, model: ModelPayload, device: str, dtype: str, threads: int | None) -> None:
        import torch

        _worker_settings()
        if threads is not None:
            torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS to the CPUs an actor reserves; see plan_for
        self.clip: Clip | None = None
        self.fatal = b""
        try:
            self.clip = model.load(device, dtype)
        except ClipError as err:
            # Sent back as data, in the `fatal` column, for the driver to raise: an exception raised here would
            # reach it as an ActorDiedError holding only a traceback's text (Ray does not pickle the cause).
            self.fatal = str(err).encode("utf-8", "surrogateescape")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(batch["index"])
        fatal = np.array([self.fatal] * rows, dtype=object)
        if self.clip is None:
            return {"index": batch["index"], "features": np.zeros((rows, 0), dtype=np.float32),
                    "error": batch["error"], "fatal": fatal}
        decoded = np.array([not error for error in batch["error"]], dtype=bool)
        features = np.zeros((rows, self.clip.config.projection_dim), dtype=np.float32)
        if decoded.any():
            features[decoded] = self.clip.image_features(list(batch["pixels"][decoded]))
        return {"index": batch["index"], "features": features, "error": batch["error"], "fatal": fatal}


# ---------------------------------------------------------------------------------------------- on the driver


class RaySession(Session):
    """A Session whose image features are computed on a Ray cluster: `address` (None: a local Ray started for the
    run, sized to this machine, and shut down by close()). Texts are encoded here on the CPU, as the local engine
    does; no index is read or written. Use it as a context manager, or call close()."""

    def __init__(self, settings: Settings, address: str | None = None) -> None:
        # The driver's own model (text tower, preprocessing, checks) runs on its CPU in float32; --device and
        # --dtype are for the model actors.
        super().__init__(replace(settings, device="cpu", dtype="fp32"), None)
        self.requested = settings
        self.address = address or None
        self._started = False
        self._loading: threading.Thread | None = None
        self._load_error: BaseException | None = None
        self._temp_dir: str | None = None  # Ray's files for the run: a local Ray's session, the driver's log
        self._log: _DriverLog | None = None
        self._printer: Any = None  # Ray's printer of cluster messages, while ours stands in for it
        self._plan: Plan | None = None
        self._cluster: Cluster | None = None  # what the cluster has, asked once
        self._payload: ModelPayload | None = None  # the model as the workers get it, put in the object store once

    def __enter__(self) -> RaySession:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Join the cluster (or start a local Ray) while the driver's model loads in a thread beside it. The model
        is resolved first, so that one that is not there is reported at once."""
        if self._started:
            return
        self.files  # noqa: B018 (resolves the model, or raises its UsageError)
        self._loading = threading.Thread(target=self._load_model, name="clip-load", daemon=True)
        self._loading.start()
        try:
            self._temp_dir = tempfile.mkdtemp(prefix="clipcli-ray-")
            self._log = _DriverLog(os.path.join(self._temp_dir, "driver.log"))
            self._connect()
        except BaseException as err:
            self.close()
            cause = _interruption(err) if isinstance(err, Exception) else None
            if cause is not None:
                raise cause from None
            raise

    def _load_model(self) -> None:
        try:
            Session.clip.fget(self)  # type: ignore[attr-defined]
        except BaseException as err:  # raised where the model is needed (clip, text_clip)
            self._load_error = err

    @property
    def clip(self) -> Clip:
        """The driver's model, on its CPU in float32, once the thread loading it beside the cluster's start is done:
        loaded and checked as the local engine loads it, the texts encoded with it, its weights sent to the workers."""
        if self._loading is not None:
            self._loading.join()
            self._loading = None
            if self._load_error is not None:
                raise self._load_error
        return super().clip

    @property
    def text_clip(self) -> Clip:
        return self.clip

    @property
    def plan(self) -> Plan:
        """How this run uses the cluster."""
        if self._plan is None:
            self.start()
            self.clip  # noqa: B018 (the plan's dtype check imports torch; the model is loaded by then)
            self._cluster = cluster_resources()
            self._plan = plan_for(self._cluster, self.requested.device, self.requested.dtype)
        return self._plan

    @property
    def precision(self) -> str:
        """fp32, fp16 or bf16: what the model actors compute in."""
        return self.plan.precision

    def image_features(self, paths: Sequence[str], progress: Progress | None = None) -> Iterator[FeatureBatch]:
        """Batches of (B, D) float32 raw image features in `paths` order, failures in the batch they fall in (as
        Session.image_features), every image computed on the cluster."""
        if not paths:
            return
        plan = self.plan
        config = self.clip.preprocess  # the local engine's preprocessing
        draft = config.draft_size if self.settings.fast_decode else None
        done = 0
        try:
            if self._payload is None:
                self._payload = ModelPayload.put(self.clip)
            assert self._cluster is not None  # asked with the plan
            dataset = _dataset(paths, plan, self._payload, config, draft, self.settings.batch_size, self._cluster.cpus)
            for block in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                index = block["index"]
                if not len(index):
                    continue
                if block["fatal"][0]:
                    raise UsageError(bytes(block["fatal"][0]).decode("utf-8", "surrogateescape"))
                if index[0] != done or index[-1] != done + len(index) - 1:
                    raise RuntimeError(f"Ray returned rows {index[0]}-{index[-1]} where row {done} was due")
                errors = [bytes(error).decode("utf-8", "surrogateescape") for error in block["error"]]
                decoded = np.array([not error for error in errors], dtype=bool)
                batch = FeatureBatch([paths[i] for i in index[decoded]], block["features"][decoded],
                                     [Failure(paths[i], error) for i, error in zip(index, errors, strict=True)
                                      if error])
                done += len(index)
                if progress is not None:
                    progress(len(index))
                yield batch
        except Exception as err:
            cause = _interruption(err)
            if cause is not None:
                raise cause from None
            raise
        if done != len(paths):
            raise RuntimeError(f"Ray returned {done} of {len(paths)} rows")

    def _connect(self) -> None:
        """Join the cluster at `address`, or start a local Ray, quiet: no dashboard, no usage stats, Ray's logs in a
        temp folder, nothing on stdout. Our signal handlers are kept (Ray's replace SIGTERM's)."""
        self._started = True
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        quiet: dict[str, Any] = dict(logging_level=logging.ERROR, log_to_driver=False, configure_logging=True)
        handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            if self.address is not None:
                _check_reachable(self.address)
                ray.init(address=self.address, **quiet)
            else:
                # Workers at the command's own priority, as the local engine computes: Ray's default (nice 15)
                # would have them yield to everything else on the machine.
                ray.init(address="local", num_cpus=default_workers(), include_dashboard=False,
                         _temp_dir=self._temp_dir, _system_config={"worker_niceness": 0}, **quiet)
        except Exception as err:
            what = f"join the Ray cluster at '{self.address}'" if self.address else "start a local Ray"
            fix = ("check --address (or RAY_ADDRESS), or omit it to start a local Ray" if self.address else
                   "pass --address of a running cluster, or use --engine local")
            cause = err.__cause__ or err
            reason = os_reason(cause) if isinstance(cause, OSError) and cause.strerror else one_line(cause)
            if "AuthToken" in reason or "Authentication" in type(cause).__name__:
                fix = ("the cluster uses token authentication: set RAY_AUTH_MODE=token and its token in "
                       "RAY_AUTH_TOKEN (or ~/.ray/auth_token)")
            raise UsageError(f"cannot {what} ({reason}); {fix}") from None
        finally:
            if threading.current_thread() is threading.main_thread():
                for signum, handler in handlers.items():
                    signal.signal(signum, handler)
        _quiet_ray_data()
        self._printer = _divert_cluster_messages()

    def close(self) -> None:
        """Leave the cluster (a local Ray is shut down) and remove its temp files."""
        if self._started:
            self._started = False
            self._payload = None  # its object is gone with the cluster connection
            ray.shutdown()
        if self._printer is not None:
            _restore_cluster_messages(self._printer)
            self._printer = None
        if self._log is not None:
            self._log.restore()
            self._log = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None


def _divert_cluster_messages() -> Any:
    """Ray's driver prints the cluster's messages (a worker died, a task is retried, an actor failed) to sys.stdout,
    which carries our results: they go to descriptor 2 instead, the run's log (_DriverLog); what matters to the run
    reaches it as exceptions. Returns Ray's printer, for _restore_cluster_messages; None when this Ray has none."""
    from ray._private import worker

    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None:
        return None

    def to_log(data: dict, ignore_prefix: bool) -> None:
        lines = "".join(f"({data.get('pid')}) {line}\n" for line in data.get("lines") or [])
        os.write(2, lines.encode("utf-8", "backslashreplace"))

    worker.print_to_stdstream = to_log
    return printer


def _restore_cluster_messages(printer: Any) -> None:
    from ray._private import worker

    worker.print_to_stdstream = printer


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """OSError unless something listens at a host:port address (a cluster's GCS, or ray://host:port for Ray Client):
    Ray itself would retry an unreachable address for many minutes. Other forms (auto) are left to Ray."""
    where = address.removeprefix("ray://")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        return
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
        pass


class _DriverLog:
    """Ray's core (C++) in this process writes some of its log lines straight to file descriptor 2, e.g. an error
    line about every Ray Data actor pool. While a run is connected, descriptor 2 points at a log file in the run's
    temp folder, and Python's sys.stderr (progress, warnings, failures) keeps writing where it did."""

    def __init__(self, path: str) -> None:
        self._saved = os.dup(2)
        self._previous: TextIO | None = None
        if _is_descriptor_2(sys.stderr):
            sys.stderr.flush()
            self._previous = sys.stderr
            sys.stderr = io.TextIOWrapper(io.FileIO(os.dup(self._saved), "w"), encoding=sys.stderr.encoding,
                                          errors=sys.stderr.errors, line_buffering=True)
        log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log, 2)
        os.close(log)

    def restore(self) -> None:
        """Descriptor 2 and sys.stderr as they were."""
        if self._previous is not None:
            sys.stderr.flush()
            sys.stderr.close()
            sys.stderr = self._previous
        os.dup2(self._saved, 2)
        os.close(self._saved)


def _is_descriptor_2(stream: object) -> bool:
    try:
        return stream.fileno() == 2  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):  # captured by a test runner, or closed
        return False


def cluster_resources() -> Cluster:
    """The CPUs and GPUs of the connected cluster, and the CPUs of each live node."""
    total = ray.cluster_resources()
    nodes = tuple(int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive"))
    return Cluster(float(total.get("CPU", 0)), float(total.get("GPU", 0)), nodes)


def _dataset(paths: Sequence[str], plan: Plan, model: ModelPayload, config: PreprocessConfig, draft: int | None,
             batch_size: int, cpus: float) -> ray.data.Dataset:
    """paths -> decode tasks (one CPU each) -> model actors -> rows of (index, features, error), in input order."""
    rows = block_rows(len(paths), cpus, batch_size)
    # Paths travel as bytes: a file name need not be UTF-8, and Arrow strings must be.
    blocks = [pa.table({"index": pa.array(range(start, min(start + rows, len(paths))), pa.int64()),
                        "path": pa.array([os.fsencode(p) for p in paths[start:start + rows]], pa.binary())})
              for start in range(0, len(paths), rows)]
    decode = functools.partial(decode_batch, config=config, draft=draft, max_pixels=Image.MAX_IMAGE_PIXELS,
                               threads=plan.decode_threads)
    decoded = ray.data.from_arrow(blocks).map_batches(
        decode, batch_size=batch_size, batch_format="numpy", num_cpus=plan.decode_cpus)
    return decoded.map_batches(
        ImageTower, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        fn_constructor_kwargs={"model": model, "device": plan.device, "dtype": plan.precision,
                               "threads": plan.threads},
        num_cpus=plan.actor_cpus, num_gpus=plan.actor_gpus or None)


def _quiet_ray_data() -> None:
    """Ray Data's settings for a run: rows in input order, no progress bars of its own, no console logging."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    for name in ("print_on_execution_start", "enable_rich_progress_bars"):
        if hasattr(context, name):
            setattr(context, name, False)
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
            handler.setLevel(_QUIET)
    logging.getLogger("ray").setLevel(logging.ERROR)


def _interruption(err: Exception) -> BaseException | None:
    """The KeyboardInterrupt or SIGTERM (process.Terminated) behind `err` (process.interruption_behind): our signal
    handlers raise them wherever the main thread is, and inside Ray's compiled code that surfaces as a SystemError
    with the interruption as its context. None for any other error."""
    from clipcli.process import interruption_behind

    return interruption_behind(err)

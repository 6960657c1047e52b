"""Command `serve`: one base in memory, its adapters beside it, an OpenAI-compatible HTTP endpoint.

Requests in flight together are generated as one batch even when they name different adapters: peft routes
each batch row through its own adapter (`adapter_names`, "__base__" for the base), so sixteen clients of
three adapters cost one forward pass per token instead of sixteen adapter switches. One worker thread owns
the model: peft passes adapter names through hooks it installs on the shared modules for the length of a
`generate` call, so two generations at once would see each other's names. Loading an adapter, building a
mix and generating all happen on that thread, between batches.

The HTTP side (Starlette on uvicorn: a small, well-kept ASGI stack with streaming responses and a body
limit built in) only parses, checks and waits: every request is checked before it reaches the queue, and
a full queue answers 503 at once instead of letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from transformers import StoppingCriteria, StoppingCriteriaList, set_seed
from transformers.generation.streamers import BaseStreamer

from qlora_cli import adapters
from qlora_cli.adapters import AdapterRecord
from qlora_cli.errors import QloraError
from qlora_cli.generate import BASE, Session

log = logging.getLogger(__name__)

PEFT_BASE_ROW = "__base__"  # peft's name for "no adapter" in a mixed batch
MIX_PREFIX = "mix:"  # a model name such as mix:sql=0.7,json=0.3 asks for a weighted combination
MAX_MIXES = 4  # weighted combinations kept built; the least recently used one is deleted beyond this


@dataclass(eq=False)
class Job:
    """One request's generation, shared by the HTTP handler (which waits on `events`) and the worker thread
    (which fills it). `events` receives ("delta", text), then ("done", finish_reason) or ("error", message)."""

    prompt_ids: list[int]
    adapter: str  # a loaded adapter's name, or BASE
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    stream: bool = False  # hand text over as it comes; otherwise once, when the job is done
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # the client went away: its row stops at the next token
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already handed to the client
    finish_reason: str | None = None

    @property
    def batch_key(self) -> tuple:
        """Jobs that can share one generate call: greedy ones all together; sampled ones by their settings,
        since temperature and top_p apply to a whole batch and a seed to its one random stream."""
        return ("greedy",) if self.temperature <= 0 else ("sample", self.temperature, self.top_p, self.seed)

    def emit(self, kind: str, value: object) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def finish(self, reason: str) -> None:
        if self.finish_reason is not None:
            return
        self.finish_reason = reason
        if len(self.text) > self.sent:
            self.emit("delta", self.text[self.sent :])
            self.sent = len(self.text)
        self.emit("done", reason)


class RowStreamer(BaseStreamer):
    """Hands each row's new text to its job as tokens arrive, and decides where each row ends: at an
    end-of-turn id, a stop string (not itself returned), its own max_tokens, or its client leaving."""

    def __init__(self, jobs: list[Job], tokenizer, stop_ids: set[int]) -> None:
        self.jobs, self.tokenizer, self.stop_ids = jobs, tokenizer, stop_ids
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        for job, token in zip(self.jobs, value.tolist()):
            if job.finish_reason is not None:
                continue
            if job.cancelled:
                job.finish("cancelled")
                continue
            if token in self.stop_ids:
                job.finish("stop")
                continue
            job.tokens.append(token)
            self._advance(job)

    def _advance(self, job: Job) -> None:
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half a character: wait for the token that completes it
            if len(job.tokens) >= job.max_tokens:
                job.finish("length")
            return
        found = [text.find(stop) for stop in job.stop if stop in text]
        if found:
            job.text = text[: min(found)]
            job.finish("stop")
            return
        job.text = text
        # Hold back what could be the start of a stop string, so that a stop string is never sent.
        held = max((len(stop) - 1 for stop in job.stop), default=0)
        ready = max(job.sent, len(text) - held)
        if ready > job.sent and job.stream:
            job.emit("delta", text[job.sent : ready])
            job.sent = ready
        if len(job.tokens) >= job.max_tokens:
            job.finish("length")

    def end(self) -> None:
        for job in self.jobs:
            job.finish("length")


class RowsDone(StoppingCriteria):
    """Per row: stop once its job has finished (or its client left); the batch ends when every row has."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = [job.finish_reason is not None or job.cancelled for job in self.jobs]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Busy(Exception):
    """The queue is full: the request is refused (503) rather than left to wait without bound."""


@dataclass
class Engine:
    """The worker thread that owns the model, and the bounded queue in front of it.

    `mixed`: requests for different adapters share a batch (peft's adapter_names). Off, each request runs
    alone after switching to its adapter: the way most servers of a single peft model work, kept as the
    baseline the benchmark compares against."""

    session: Session
    max_batch: int = 16
    queue_size: int = 64
    mixed: bool = True
    # A batch waits for more requests while they keep coming (`window_s` at most between two of them), and
    # until as many have come as the last batch answered, `gather_s` in all: clients answered by the last
    # batch send their next request within milliseconds, and a batch that starts without them runs half
    # empty while they wait for the next one.
    window_s: float = 0.01
    gather_s: float = 0.1
    _waiting: collections.deque = field(default_factory=collections.deque)
    _calls: collections.deque = field(default_factory=collections.deque)
    _ready: threading.Condition = field(default_factory=threading.Condition)
    _arrived: int = 0  # requests submitted so far, to tell whether more came in during a wait
    _answered: int = 0  # rows of the last batch: about how many clients will be back at once
    _stopping: bool = False
    _owner: threading.Thread | None = None  # the thread running `work`, the only one that touches the model
    _thread: threading.Thread | None = None
    batches: int = 0  # generate calls made, for the benchmark and the health endpoint
    rows: int = 0
    cancelled: int = 0  # requests whose client left before the answer was done

    def start(self) -> None:
        """Work on a thread of its own (for a server embedded in another program; `qlora serve` works on
        its main thread, where PyTorch's CPU kernels run fastest)."""
        self._thread = threading.Thread(target=self.work, name="qlora-serve", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._ready:
            if self._stopping:
                raise Busy("the server is shutting down")
            if len(self._waiting) >= self.queue_size:
                raise Busy(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(job)
            self._arrived += 1
            self._ready.notify()

    def call(self, function: Callable[[Session], object]) -> concurrent.futures.Future:
        """Run `function(session)` on the working thread between batches (loading an adapter, building a
        mix); at once when no thread works yet or the caller is that thread."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._owner is None or self._owner is threading.current_thread():
            _settle(future, function, self.session)
            return future
        with self._ready:
            self._calls.append((function, future))
            self._ready.notify()
        return future

    def stop(self) -> None:
        """Finish what is queued, then end `work`."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def claim(self) -> None:
        """Make the calling thread the one that will `work`: from now on, calls from other threads queue."""
        self._owner = threading.current_thread()

    def work(self, until: Callable[[], bool] = lambda: False) -> None:
        """Generate batches on the calling thread until `stop` (or `until()` turns true) and the queue is
        empty. Waits are short, so that a signal handler on the main thread runs between them."""
        self.claim()
        try:
            while True:
                with self._ready:
                    while not (self._waiting or self._calls):
                        if self._stopping or until():
                            return
                        self._ready.wait(0.2)
                    if self._calls:
                        function, future = self._calls.popleft()
                        batch = None
                    else:
                        self._gather()
                        batch = self._take()
                if batch is None:
                    _settle(future, function, self.session)
                else:
                    self._generate(batch)
        finally:
            self._owner = None

    def _gather(self) -> None:
        """Wait (holding the condition) for the rest of a batch: while requests keep arriving, and while
        fewer are waiting than the last batch answered, up to a full batch and `gather_s` in all."""
        if not self.mixed:
            return
        started = time.monotonic()
        expected = min(self.max_batch, max(1, self._answered))
        while len(self._waiting) < self.max_batch:
            seen = self._arrived
            left = started + self.gather_s - time.monotonic()
            if left <= 0:
                return
            coming_back = len(self._waiting) < expected
            self._ready.wait(left if coming_back else min(self.window_s, left))
            if self._arrived == seen and not coming_back:  # none came within the window: the burst is over
                return

    def _take(self) -> list[Job]:
        """The oldest waiting job and, when mixing, every other waiting job that can share its batch. A DoRA
        adapter shares a batch only with requests for itself: peft cannot route it per row."""
        first = self._waiting.popleft()
        batch = [first]
        if self.mixed:
            session = self.session
            dora = session.is_dora(first.adapter)
            for job in list(self._waiting):
                if len(batch) >= self.max_batch:
                    break
                if job.batch_key != first.batch_key:
                    continue
                if (dora or session.is_dora(job.adapter)) and job.adapter != first.adapter:
                    continue
                batch.append(job)
                self._waiting.remove(job)
        return batch

    def _generate(self, batch: list[Job]) -> None:
        for job in batch:
            if job.cancelled:
                job.finish("cancelled")
                self.cancelled += 1
        batch = [job for job in batch if job.finish_reason is None]
        if not batch:
            return
        session, first = self.session, batch[0]
        tokenizer = session.tokenizer
        width = max(len(job.prompt_ids) for job in batch)
        pad = tokenizer.pad_token_id
        device = session.model.device
        input_ids = torch.tensor(
            [[pad] * (width - len(job.prompt_ids)) + job.prompt_ids for job in batch], device=device
        )
        attention = torch.tensor(
            [[0] * (width - len(job.prompt_ids)) + [1] * len(job.prompt_ids) for job in batch], device=device
        )
        stop_ids = {token for job in batch for token in session.stop_ids(job.adapter)}
        kwargs: dict = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "max_new_tokens": max(job.max_tokens for job in batch),
            "eos_token_id": sorted(stop_ids),
            "pad_token_id": pad,
            "streamer": RowStreamer(batch, tokenizer, stop_ids),
            "stopping_criteria": StoppingCriteriaList([RowsDone(batch)]),
        }
        if first.temperature > 0:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p)
        else:
            kwargs.update(do_sample=False)
        set_seed(first.seed or 0)
        try:
            with torch.inference_mode():
                # One adapter for the whole batch runs as a plain adapter: peft's per-row routing costs a
                # gather and scatter per layer that only a mixed batch needs.
                if len({job.adapter for job in batch}) > 1 and isinstance(session.model, PeftModel):
                    names = [PEFT_BASE_ROW if job.adapter == BASE else job.adapter for job in batch]
                    session.model.generate(**kwargs, adapter_names=names)
                else:
                    with session.using(first.adapter):
                        session.model.generate(**kwargs)
        except Exception as error:  # noqa: BLE001 - one failed batch answers its requests; the server stays up
            log.exception("generation failed")
            message = f"generation failed: {type(error).__name__}: {error}"
            for job in batch:
                if job.finish_reason is None:
                    job.finish_reason = "error"
                    job.emit("error", message)
        self.batches += 1
        self.rows += len(batch)
        self._answered = len(batch)
        self.cancelled += sum(job.finish_reason == "cancelled" for job in batch)


@dataclass
class Catalog:
    """The names a request may give: the base (by its id, its short name or 'none'), every loaded adapter,
    and weighted mixes built on first use. Adapters trained into the home while the server runs are loaded
    when a request or a listing first looks for them; ones trained on another base are listed as refused,
    with the reason."""

    engine: Engine
    base_id: str
    fingerprint: str
    home: str | None
    watch: bool  # pick up adapters that appear in the home
    refused: dict[str, str] = field(default_factory=dict)  # folder name -> why it is not served
    _mixes: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # spec -> peft name
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _mix_count: int = 0

    @property
    def base_names(self) -> tuple[str, ...]:
        return (self.base_id, Path(self.base_id).name, BASE)

    def adapters(self) -> list[str]:
        return [name for name in self.engine.session.styles if name not in self._mixes.values()]

    def refresh(self) -> None:
        """Load the adapters that appeared in the home since the last look (on the worker thread)."""
        if not self.watch:
            return
        known = set(self.engine.session.styles) | set(self.refused)
        fresh = [folder for folder in adapters.list_adapter_dirs(self.home) if folder.name not in known]
        if fresh:
            self.engine.call(lambda session: [self._load(session, folder) for folder in fresh]).result()

    def _load(self, session: Session, folder: Path) -> None:
        try:
            record = AdapterRecord.load(folder)
            record.check_base(self.base_id, self.fingerprint)
            style = record.style
        except QloraError as error:
            self.refused[folder.name] = str(error)
            log.warning("adapter %s is not served: %s", folder.name, error)
            return
        load_adapter(session, folder, style)
        log.info("adapter %s loaded", folder.name)

    def resolve(self, model: str) -> str:
        """The loaded name a request's `model` routes to; QloraError (404) for one that is not served."""
        if model in self.base_names:
            return BASE
        if model.startswith(MIX_PREFIX):
            return self._mix(model)
        if model not in self.engine.session.styles:
            self.refresh()
        if model in self.refused:
            raise QloraError(f"model {model!r} is not served: {self.refused[model]}")
        if model not in self.engine.session.styles or model in self._mixes.values():
            raise QloraError(f"model {model!r} is not served; GET /v1/models lists the base and the adapters")
        return model

    def _mix(self, model: str) -> str:
        from qlora_cli.generate import parse_mix

        weights = parse_mix(model[len(MIX_PREFIX) :])
        for name in weights:
            if name not in self.adapters():
                self.refresh()
            if name not in self.adapters():
                raise QloraError(f"model {model!r}: {name!r} is not a served adapter")
        spec = ",".join(f"{name}={weight:g}" for name, weight in sorted(weights.items()))
        with self._lock:
            if spec in self._mixes:
                self._mixes.move_to_end(spec)
                return self._mixes[spec]
            self._mix_count += 1
            name = f"mix-{self._mix_count}"  # peft names cannot hold '.', which weights do
            evicted = self._mixes.popitem(last=False)[1] if len(self._mixes) >= MAX_MIXES else None
            self._mixes[spec] = name
        self.engine.call(lambda session: _build_mix(session, name, weights, evicted)).result()
        return name

    def listing(self) -> dict:
        self.refresh()
        created = int(time.time())
        names = [self.base_id, *self.adapters()]
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "qlora"} for name in names],
            "refused": [{"id": name, "reason": reason} for name, reason in sorted(self.refused.items())],
        }


def _settle(future: concurrent.futures.Future, function: Callable[[Session], object], session: Session) -> None:
    try:
        future.set_result(function(session))
    except BaseException as error:  # noqa: BLE001 - handed to the caller, which raises it
        future.set_exception(error)


def load_adapter(session: Session, folder: Path, style) -> None:
    """One more adapter beside the others (on the worker thread)."""
    name = folder.name
    if isinstance(session.model, PeftModel):
        session.model.load_adapter(str(folder), adapter_name=name)
    else:
        session.model = PeftModel.from_pretrained(session.model, str(folder), adapter_name=name)
        session.model.eval()
    session.styles[name] = style


def _build_mix(session: Session, name: str, weights: dict[str, float], evicted: str | None) -> None:
    if evicted is not None:
        session.model.delete_adapter(evicted)
        session.styles.pop(evicted, None)
    session.add_mix(weights, name=name)


async def collect(job: Job) -> tuple[str, str]:
    """(text, finish_reason) of a job, once it is done."""
    pieces = []
    while True:
        kind, value = await job.events.get()
        if kind == "delta":
            pieces.append(value)
        elif kind == "done":
            return "".join(pieces), value
        else:
            raise GenerationFailed(value)


class GenerationFailed(Exception):
    pass


async def stream_events(job: Job, chunk: Callable[[str | None, str | None], dict]) -> AsyncIterator[str]:
    """Server-sent events of a job: one chunk per piece of text, a last one with the finish reason, then
    [DONE]. A client that leaves cancels this generator: its row stops at the next token."""
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "delta":
                yield f"data: {json.dumps(chunk(value, None))}\n\n"
            elif kind == "done":
                yield f"data: {json.dumps(chunk(None, value))}\n\n"
                yield "data: [DONE]\n\n"
                return
            else:
                yield f"data: {json.dumps(error_body(500, value, 'server_error'))}\n\n"
                return
    finally:
        if job.finish_reason is None:
            job.cancelled = True


def error_body(status: int, message: str, kind: str | None = None, param: str | None = None) -> dict:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error"}
    codes = {401: "invalid_api_key", 404: "model_not_found", 413: "request_too_large", 503: "server_busy"}
    return {
        "error": {
            "message": message,
            "type": kind or kinds.get(status, "invalid_request_error"),
            "param": param,
            "code": codes.get(status),
        }
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def open_catalog(
    adapter_refs: list[str],
    *,
    base: str | None = None,
    home: str | None = None,
    max_batch: int = 16,
    queue_size: int = 64,
    mixed: bool = True,
) -> Catalog:
    """Load the base and the named adapters (none named: every adapter in the home, which must share one
    base); the engine is started by `run` (or `Engine.start`). Adapters that appear in the home later are loaded when first asked for."""
    from qlora_cli.generate import open_session

    watch = not adapter_refs
    if watch:
        records = [AdapterRecord.load(folder) for folder in adapters.list_adapter_dirs(home)]
        if base is None:
            bases = sorted({record.base.id or "?" for record in records})
            if not records:
                raise QloraError(
                    f"no adapters in {adapters.adapters_home(home)}: name some with --adapter, or serve a base alone "
                    "with --base MODEL"
                )
            if len(bases) > 1:
                raise QloraError(
                    f"the adapters in {adapters.adapters_home(home)} were trained on {len(bases)} bases "
                    f"({', '.join(bases)}); choose one with --base, or name adapters with --adapter"
                )
            adapter_refs = [records[0].folder.name]
        else:
            adapter_refs = ["none"]
    session = open_session(adapter_refs, base=base, home=home)
    engine = Engine(session, max_batch=max_batch, queue_size=queue_size, mixed=mixed)
    catalog = Catalog(engine, base_id=session.base_id, fingerprint=session.fingerprint, home=home, watch=watch)
    catalog.refresh()
    return catalog


@dataclass(frozen=True)
class Served:
    """What a finished `qlora serve` did, for its last line."""

    address: str
    requests: int
    batches: int

    def render(self) -> str:
        return f"stopped serving {self.address}: {self.requests} requests in {self.batches} batches"


def run(catalog: Catalog, *, host: str, port: int, api_key: str | None, max_body: int) -> Served:
    """Serve until SIGTERM or Ctrl-C; requests in flight are finished first.

    The engine works on this (the main) thread and HTTP runs on another: PyTorch's CPU kernels run about
    1.6 times slower when called from a second thread (their OpenMP team is the main thread's), and the
    HTTP side only waits on sockets. The signal handlers are ours, as only the main thread gets signals."""
    import signal

    import uvicorn

    from qlora_cli.api import create_app

    address = f"http://{host}:{port}"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if not self.should_exit:  # listening now: the line scripts and tests wait for
                names = ", ".join([catalog.base_id, *catalog.adapters()])
                log.warning("serving %s on %s/v1 (OpenAI API)", names, address)

    app = create_app(catalog, api_key=api_key, max_body=max_body)
    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))

    def shut_down(*_) -> None:
        # The first signal stops taking requests and finishes those in flight; a second Ctrl-C stops
        # waiting for them, as uvicorn's own handler does.
        server.force_exit = server.should_exit
        server.should_exit = True

    http = threading.Thread(target=server.run, name="qlora-http", daemon=True)
    previous = {number: signal.signal(number, shut_down) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        catalog.engine.claim()  # before the first request can ask for an adapter to be loaded
        http.start()
        catalog.engine.work(until=lambda: not http.is_alive())
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    http.join()
    if not server.started:  # uvicorn has logged why (the port is taken, say)
        raise QloraError(f"could not serve on {address}")
    return Served(address=address, requests=catalog.engine.rows, batches=catalog.engine.batches)

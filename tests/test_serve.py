"""`qlora serve` on the tiny base: the engine's mixed batches, and the real server driven by the official
`openai` client and plain HTTP."""

import asyncio
import json
import shutil
import signal
import subprocess
from pathlib import Path

import openai
import pytest
from helpers import QLORA, free_port, read_until

from benchmarks.bench_serve import load_test, synthetic_adapter
from qlora_cli.generate import BASE, open_session
from qlora_cli.serve import Busy, Engine, Job, collect

API_KEY = "test-key"
PROMPTS = ["Repeat the input.", "Copy the input exactly.", "Quote each word of the input."]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve-home")
    for seed, name in enumerate(("red", "blue")):
        synthetic_adapter(folder / name, seed)
    return folder


def run_jobs(engine: Engine, asks: list[tuple[str, str]], *, start: bool) -> list[tuple[str, str]]:
    """Submit every (adapter, prompt) before the engine starts (so they wait together), then collect."""

    async def main():
        loop = asyncio.get_running_loop()
        session = engine.session
        jobs = [
            Job(
                prompt_ids=session.prompt_ids({"instruction": prompt, "input": "red blue green"}, adapter),
                adapter=adapter,
                max_tokens=12,
                temperature=0.0,
                top_p=1.0,
                seed=None,
                stop=(),
                loop=loop,
            )
            for adapter, prompt in asks
        ]
        for job in jobs:
            engine.submit(job)
        if start:
            engine.start()
        return [await collect(job) for job in jobs]

    return asyncio.run(main())


def test_requests_for_different_adapters_share_one_batch_and_answer_as_they_would_alone(home):
    session = open_session(["red", "blue"], home=str(home))
    asks = [(adapter, prompt) for prompt in PROMPTS for adapter in ("red", "blue", BASE)]
    mixed = Engine(session, max_batch=16)
    together = run_jobs(mixed, asks, start=True)
    mixed.stop()
    assert (mixed.batches, mixed.rows) == (1, len(asks))
    alone = Engine(session, mixed=False)
    one_by_one = run_jobs(alone, asks, start=True)
    alone.stop()
    assert alone.batches == len(asks)
    assert together == one_by_one
    # Each adapter really answers as itself: the three answers to one prompt are not all the same.
    assert all(len({text for text, _ in together[i : i + 3]}) > 1 for i in range(0, len(asks), 3))


def test_a_dora_adapter_batches_only_with_itself_and_cannot_join_a_mix(home, tmp_path):
    from qlora_cli.errors import QloraError

    shutil.copytree(home / "red", tmp_path / "red")
    synthetic_adapter(tmp_path / "dora", 5, use_dora=True)
    session = open_session(["red", "dora"], home=str(tmp_path))
    asks = [(adapter, PROMPTS[0]) for adapter in ("red", "dora", BASE, "dora")]
    engine = Engine(session, max_batch=16)
    together = run_jobs(engine, asks, start=True)
    engine.stop()
    assert engine.batches == 2  # red with the base, and the two dora requests together
    alone = Engine(session, mixed=False)
    assert together == run_jobs(alone, asks, start=True)
    alone.stop()
    with pytest.raises(QloraError, match="cannot mix dora"):
        session.add_mix({"red": 0.5, "dora": 0.5}, name="m")


def test_a_full_queue_refuses_at_once_instead_of_waiting():
    engine = Engine(session=None, queue_size=2)  # not started: nothing leaves the queue

    async def main():
        loop = asyncio.get_running_loop()
        job = dict(prompt_ids=[1], adapter=BASE, max_tokens=1, temperature=0.0, top_p=1.0, seed=None, stop=())
        engine.submit(Job(**job, loop=loop))
        engine.submit(Job(**job, loop=loop))
        with pytest.raises(Busy, match="2 requests are already waiting"):
            engine.submit(Job(**job, loop=loop))

    asyncio.run(main())


def health(url: str) -> dict:
    import urllib.request

    request = urllib.request.Request(f"{url}/health", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


def wait_for(condition, what: str, seconds: float = 120) -> None:
    """Poll until `condition()` holds: the event the test waits for. The bound only turns a hang into a failure."""
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never saw {what}")
        time.sleep(0.02)


def test_a_full_queue_answers_503_and_a_client_that_leaves_frees_its_slot(home):
    import threading

    import uvicorn

    from qlora_cli.api import create_app
    from qlora_cli.serve import Catalog

    session = open_session(["red", "blue"], home=str(home))
    engine = Engine(session, queue_size=2)  # not started yet: requests wait in the queue
    catalog = Catalog(engine, base_id=session.base_id, fingerprint="", home=str(home), watch=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(catalog, api_key=API_KEY), port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: server.started, "the server start")
    api = client(url)
    ask = {"model": "red", "messages": [{"role": "user", "content": "Repeat the input.\n\nred"}], "max_tokens": 8}
    # A streaming client that leaves: its request is marked, and the engine drops it instead of generating.
    api.chat.completions.create(**ask, stream=True).close()
    wait_for(lambda: engine.waiting == 1 and engine._waiting[0].cancelled, "the stream's request marked as left")
    first: list = []
    waiting = threading.Thread(target=lambda: first.append(api.chat.completions.create(**ask)))
    waiting.start()
    wait_for(lambda: health(url)["waiting"] == 2, "the second request queued")
    with pytest.raises(openai.InternalServerError) as refused:
        api.chat.completions.create(**ask)
    assert refused.value.status_code == 503 and refused.value.response.headers["x-should-retry"] == "false"
    engine.start()
    waiting.join()
    assert first[0].choices[0].message.content is not None
    assert health(url)["cancelled"] == 1
    mixed = api.chat.completions.create(**{**ask, "model": "mix:red=0.5,blue=0.5"})  # built on first use
    assert mixed.model == "mix:red=0.5,blue=0.5" and mixed.choices[0].message.content is not None
    server.should_exit = True
    engine.stop()


@pytest.fixture(scope="module")
def server(home):
    """`qlora serve` on the two adapters, with an API key, in its own process; stopped with SIGTERM."""
    port = free_port()
    process = subprocess.Popen(
        [*QLORA, "serve", "--adapters-dir", str(home), "--port", str(port), "--api-key", API_KEY, "--max-body", "4096"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    read_until(process.stdout, "serving")
    yield process, f"http://127.0.0.1:{port}"
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def client(url: str, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_the_openai_client_lists_and_asks_the_base_and_each_adapter(server):
    _, url = server
    api = client(url)
    names = [model.id for model in api.models.list().data]
    assert names[1:] == ["blue", "red"] and Path(names[0]).name == "base"
    question = [{"role": "user", "content": "Repeat the input.\n\nred blue green"}]
    answers = {}
    for name in ("red", "blue", names[0]):
        reply = api.chat.completions.create(model=name, messages=question, max_tokens=12, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens > 0
        answers[name] = reply.choices[0].message.content
        streamed = list(
            api.chat.completions.create(model=name, messages=question, max_tokens=12, temperature=0, stream=True)
        )
        pieces = [chunk.choices[0].delta.content or "" for chunk in streamed]
        assert "".join(pieces) == answers[name]  # the stream is the same answer, piece by piece
        assert [chunk.choices[0].delta.role for chunk in streamed] == ["assistant"] + [None] * (len(streamed) - 1)
    assert len(set(answers.values())) > 1
    text = api.completions.create(model="red", prompt="red blue", max_tokens=5, temperature=0)
    assert text.object == "text_completion" and text.choices[0].text


def post(url: str, body: bytes) -> tuple[int, dict]:
    """A raw POST, for bodies the openai client would never send: (status, JSON body)."""
    import urllib.error
    import urllib.request

    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers)) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_each_bad_request_gets_its_openai_status(server):
    _, url = server
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").models.list()
    api = client(url)
    ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with pytest.raises(openai.NotFoundError, match="not served"):
        api.chat.completions.create(model="green", **ask)
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        api.chat.completions.create(model="red", temperature=3, **ask)
    with pytest.raises(openai.UnprocessableEntityError, match="n"):
        api.chat.completions.create(model="red", n=2, **ask)
    status, body = post(f"{url}/v1/chat/completions", b"{not json")
    assert status == 400 and "not JSON" in body["error"]["message"]
    huge = json.dumps({"model": "red", "messages": [{"role": "user", "content": "x" * 10_000}]})
    status, body = post(f"{url}/v1/chat/completions", huge.encode())
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # The server is still up and answering after all of them.
    assert api.chat.completions.create(model="red", **ask).choices[0].message is not None


def test_an_adapter_trained_while_serving_is_served_and_one_for_another_base_is_refused(server, home):
    _, url = server
    api = client(url)
    shutil.copytree(home / "red", home / "green")
    other = home / "other-base"
    shutil.copytree(home / "blue", other)
    (other / "qlora.json").write_text(
        json.dumps({"name": "other-base", "base": {"id": "x/y", "fingerprint": "0" * 16}})
    )
    try:
        listing = api.models.list()
        assert "green" in [model.id for model in listing.data]
        refused = {entry["id"]: entry["reason"] for entry in listing.model_extra["refused"]}
        assert "was trained on x/y" in refused["other-base"]
        reply = api.chat.completions.create(model="green", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.model == "green"
        with pytest.raises(openai.NotFoundError, match="was trained on x/y"):
            api.chat.completions.create(model="other-base", messages=[{"role": "user", "content": "hi"}])
    finally:
        shutil.rmtree(home / "green")
        shutil.rmtree(other)


def test_eight_clients_for_six_seconds_lose_no_request_and_the_memory_holds(server):
    process, url = server
    before = health(url)["requests"]
    load = load_test(url, ["red", "blue", "none"], process, clients=8, seconds=6, key=API_KEY)
    assert load["failed"] == 0, load["errors"]
    assert health(url)["requests"] - before == load["requests"] > 8
    assert health(url)["waiting"] == 0
    # After the first quarter (allocations of the first batches of each size), the memory stays put.
    assert max(load["rss_mib"][1:]) - load["rss_mib"][1] < 32, load["rss_mib"]


def test_sigterm_finishes_the_request_in_flight_and_exits_0(server):
    """Last in this file: it stops the module's server."""
    process, url = server
    stream = client(url).completions.create(model="red", prompt="red blue", max_tokens=40, temperature=0, stream=True)
    chunks = iter(stream)
    first = next(chunks)  # generating now
    process.send_signal(signal.SIGTERM)
    rest = list(chunks)
    assert (rest[-1] if rest else first).choices[0].finish_reason in ("stop", "length")
    assert process.wait(timeout=120) == 0
    assert "stopped serving" in process.stdout.read()

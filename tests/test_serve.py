"""`xmtf-onnx serve`: a real server on 127.0.0.1 (a free port), real HTTP; every answer equals generate() alone."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from xmtf_onnx.runtime import load
from xmtf_onnx.runtime.serve import Limits, Server, build_app

from conftest import sample_prompts


class Running:
    """A server in a thread of this process, stopped (gracefully) at the end."""

    def __init__(self, folder, limits: Limits | None = None, api_key: str | None = None):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = Server(str(folder), limits=limits or Limits(), api_key=api_key, name="m")
        config = uvicorn.Config(build_app(self.server), host="127.0.0.1", port=self.port, log_level="error")
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", headers=self.headers(), timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError("the server did not become ready in 60 s")

    def headers(self):
        key = self.server.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def post(self, body, **kwargs):
        return httpx.post(f"{self.url}/v1/completions", json=body, headers=self.headers(), timeout=60, **kwargs)

    def __exit__(self, *exc):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module", params=["mt5", "bloom"])
def served(request):
    folder = request.getfixturevalue(f"{request.param}_export")
    with Running(folder) as running:
        yield running, load(folder)


def test_completions_equal_generate(served):
    running, model = served
    prompt = sample_prompts(1)[0]
    body = running.post({"prompt": prompt, "max_tokens": 12}).json()
    expected = model.generate(prompt, max_new_tokens=12)
    choice = body["choices"][0]
    assert choice["token_ids"] == expected.sequences[0] and choice["text"] == expected.texts[0]
    assert choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] == len(expected.sequences[0])
    ids = model.tokenizer.encode(prompt).ids
    assert running.post({"prompt": ids, "max_tokens": 12, "temperature": 0}).json()["choices"][0]["token_ids"] == \
        expected.sequences[0]
    beams = running.post({"prompt": [ids, ids[:5]], "max_tokens": 8, "num_beams": 3, "n": 2}).json()
    assert [c["token_ids"] for c in beams["choices"]] == model.generate(
        input_ids=[ids, ids[:5]], max_new_tokens=8, num_beams=3, num_return_sequences=2).sequences
    sampled = running.post({"prompt": ids, "max_tokens": 8, "temperature": 0.8, "top_p": 0.9, "seed": 7, "n": 2})
    assert [c["token_ids"] for c in sampled.json()["choices"]] == model.generate(
        input_ids=[ids], max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, seed=7,
        num_return_sequences=2).sequences
    scored = running.post({"prompt": ids, "max_tokens": 5, "logprobs": 1}).json()["choices"][0]
    reference = model.generate(input_ids=[ids], max_new_tokens=5, output_scores=True)
    assert scored["logprobs"]["token_logprobs"] == pytest.approx(reference.token_scores[0], abs=1e-5)


def test_stream_equals_the_completion(served):
    running, model = served
    prompt = sample_prompts(2)[1]
    whole = running.post({"prompt": prompt, "max_tokens": 10}).json()["choices"][0]["text"]
    pieces, ids, done = [], [], False
    with httpx.stream("POST", f"{running.url}/v1/completions", json={"prompt": prompt, "max_tokens": 10,
                                                                      "stream": True}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                pieces += [c["text"] for c in json.loads(line[6:])["choices"]]
                ids += [t for c in json.loads(line[6:])["choices"] for t in c["token_ids"]]
    assert done and "".join(pieces) == whole
    assert ids == model.generate(prompt, max_new_tokens=10).sequences[0]  # each chunk carries its new token ids


def test_concurrent_clients_with_mixed_options_get_their_own_answers(served):
    """Requests that share batches (different max_tokens, stop strings) each equal generate() of that request alone."""
    running, model = served
    prompts = sample_prompts(8)
    jobs = [{"prompt": p, "max_tokens": 4 + 2 * (i % 4)} for i, p in enumerate(prompts)]
    alone = [model.generate(p, max_new_tokens=j["max_tokens"]) for p, j in zip(prompts, jobs)]
    for job, expected in zip(jobs[:3], alone):  # a stop string taken from the answer ends it there (OpenAI: excluded)
        text = expected.texts[0]
        if len(text.strip()) > 4:
            job["stop"] = text.strip()[2:4]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: running.post(job).json(), jobs * 2))
    samples = [s for f in text_string_to_metric_families(httpx.get(f"{running.url}/metrics").text)
               if f.name == "xmtf_batch_size" for s in f.samples]
    single = next(s.value for s in samples if s.name == "xmtf_batch_size_bucket" and s.labels["le"] == "1.0")
    batches = next(s.value for s in samples if s.name == "xmtf_batch_size_count")
    for job, answer, expected in zip(jobs * 2, answers, alone * 2):
        choice = answer["choices"][0]
        if "stop" in job:
            full = expected.texts[0]
            assert choice["text"] == full[:full.find(job["stop"])] and choice["finish_reason"] == "stop"
            assert expected.sequences[0][:len(choice["token_ids"])] == choice["token_ids"]
        else:
            assert choice["token_ids"] == expected.sequences[0]
    assert single < batches  # some batches held several requests (the point of the server)


def test_sampled_and_greedy_requests_share_batches_and_equal_generate_alone(served):
    """Seeded sampled requests of one prompt (n 1 or 2) join the running batch beside greedy ones (each with its own
    temperature, top-p, top-k): each answer equals generate() of that request alone, and batches held several."""
    running, model = served
    prompts = sample_prompts(8)
    jobs = [dict({"prompt": p, "max_tokens": 6 + i % 3},
                 **({"temperature": 0.6 + 0.2 * (i % 3), "seed": i, "top_p": 0.9} if i % 2 else {}),
                 **({"top_k": 5} if i % 4 == 1 else {}), **({"n": 2} if i % 4 == 3 else {}))
            for i, p in enumerate(prompts)]
    alone = [model.generate(p, max_new_tokens=j["max_tokens"], do_sample="seed" in j, seed=j.get("seed"),
                            temperature=j.get("temperature"), top_p=j.get("top_p"), top_k=j.get("top_k"),
                            num_return_sequences=j.get("n", 1))
             for p, j in zip(prompts, jobs)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: running.post(job).json(), jobs))
        for answer, expected in zip(answers, alone):
            assert [c["token_ids"] for c in answer["choices"]] == expected.sequences
        sampled = [(job, expected) for job, expected in zip(jobs, alone) if "seed" in job]
        before = _batch_size_samples(running)
        answers = list(pool.map(lambda job: running.post(job).json(), [job for job, _ in sampled] * 2))
        after = _batch_size_samples(running)
    for answer, (_, expected) in zip(answers, sampled * 2):
        assert [c["token_ids"] for c in answer["choices"]] == expected.sequences
    assert after["count"] - before["count"] > after["le1"] - before["le1"], "sampled requests should share steps"


def test_a_sampled_request_whose_draw_fails_gets_its_error_and_its_batch_mates_go_on(bloom_export, monkeypatch):
    """A row of NaN scores makes a draw fail (InferenceError): that request alone is answered 500 with the message;
    the sampled and greedy requests sharing its steps still get generate()'s answers."""
    from xmtf_onnx.runtime import batching
    from xmtf_onnx.runtime.errors import InferenceError

    model = load(bloom_export)
    if not model.batch_invariant:
        pytest.skip(f"batch-variant on this machine ({model.batch_variance})")
    draw = batching.sample_columns

    def poisoned(scores, config, rng, *rest):
        if config.seed == 13:
            raise InferenceError("the model's scores for a row are NaN (a test)")
        return draw(scores, config, rng, *rest)
    monkeypatch.setattr(batching, "sample_columns", poisoned)
    prompts = sample_prompts(3)
    long = {"prompt": prompts[2], "max_tokens": 300, "min_tokens": 300, "stream": True}
    started, pieces = threading.Event(), []
    with Running(bloom_export) as running:
        def stream_long():  # a greedy request running while the others join its batch
            with httpx.stream("POST", f"{running.url}/v1/completions", json=long, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        pieces.extend(c["text"] for c in json.loads(line[6:])["choices"])
                        started.set()
        thread = threading.Thread(target=stream_long)
        thread.start()
        assert started.wait(30)
        with ThreadPoolExecutor(2) as pool:
            failed, sampled = pool.map(running.post, [
                {"prompt": prompts[0], "max_tokens": 8, "temperature": 0.7, "seed": 13},
                {"prompt": prompts[1], "max_tokens": 8, "temperature": 0.7, "seed": 5}])
        thread.join(120)
    assert failed.status_code == 500 and "NaN (a test)" in failed.json()["error"]["message"]
    assert sampled.json()["choices"][0]["token_ids"] == model.generate(
        prompts[1], max_new_tokens=8, do_sample=True, temperature=0.7, seed=5).sequences[0]
    assert "".join(pieces) == model.generate(prompts[2], max_new_tokens=300, min_new_tokens=300).texts[0]


def _batch_size_samples(running) -> dict:
    samples = [s for f in text_string_to_metric_families(httpx.get(f"{running.url}/metrics").text)
               if f.name == "xmtf_batch_size" for s in f.samples]
    return {"le1": next(s.value for s in samples if s.name == "xmtf_batch_size_bucket" and s.labels["le"] == "1.0"),
            "count": next(s.value for s in samples if s.name == "xmtf_batch_size_count")}


@pytest.mark.parametrize("batching", ["exact", "padded"])
def test_a_batch_variant_model_serves_one_request_at_a_time_unless_padded(bloom_export, batching, monkeypatch):
    """Where a row is computed differently alone and in a batch (Model.batch_variance: int8-dynamic, or a kernel's
    one-row path on this machine), exact serving runs requests one at a time, each still equal to generate()
    alone; --batching padded batches them anyway, as asked."""
    from xmtf_onnx.runtime.model import Model

    monkeypatch.setattr(Model, "batch_variance", property(lambda self: "a test's reason"))
    model = load(bloom_export)
    prompts = sample_prompts(6)
    alone = [model.generate(p, max_new_tokens=6).sequences[0] for p in prompts]
    with Running(bloom_export, Limits(batching=batching)) as running:
        assert httpx.get(f"{running.url}/ready").json()["batching"] == \
            ("one request at a time" if batching == "exact" else "padded")
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda p: running.post({"prompt": p, "max_tokens": 6}).json(), prompts))
        sizes = _batch_size_samples(running)
    if batching == "exact":
        assert [a["choices"][0]["token_ids"] for a in answers] == alone
        assert sizes["le1"] == sizes["count"], "every run held one request"
    else:
        assert sizes["le1"] < sizes["count"], "padded batches several requests"


def test_bad_requests_are_4xx_with_the_runtimes_message(served):
    running, model = served
    cases = [({"prompt": "hi", "frobnicate": 1}, 400, "unknown field"),
             ({"prompt": ""}, 400, "empty"),
             ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
             ({"prompt": "hi", "max_tokens": 10 ** 6}, 400, "max_tokens"),
             ({"prompt": [10 ** 9]}, 400, "outside"),
             ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
             ({"prompt": "hi", "n": 2}, 400, "n > 1 needs sampling"),
             ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
             ({"prompt": "hi", "echo": True}, 400, "unsupported"),
             ({"prompt": [5] * 2000}, 400, "tokens; this server allows"),
             ({"prompt": "hi", "model": "other"}, 400, "serves model")]
    for body, status, message in cases:
        response = running.post(body)
        assert response.status_code == status and message in response.json()["error"]["message"], (body, response.text)
    assert httpx.post(f"{running.url}/v1/completions", content=b"{not json", timeout=10).status_code == 400
    big = httpx.post(f"{running.url}/v1/completions", content=b"x" * (2 << 20), timeout=10)
    assert big.status_code == 413
    metrics = {s.name: s.value for f in text_string_to_metric_families(httpx.get(f"{running.url}/metrics").text)
               for s in f.samples if s.labels.get("outcome") == "bad_request"}
    assert metrics["xmtf_requests_total"] >= len(cases)
    assert httpx.get(f"{running.url}/v1/models").json()["data"][0]["id"] == "m"
    assert httpx.get(f"{running.url}/health").status_code == 200
    assert httpx.get(f"{running.url}/ready").json()["batching"] == "exact"  # the default says what it does


def test_full_queue_timeouts_keys_and_a_cancelled_stream(bloom_export):
    limits = Limits(max_batch_size=1, max_queue=1, request_timeout=60, max_tokens=20000)
    with Running(bloom_export, limits, api_key="secret") as running:
        assert httpx.get(f"{running.url}/ready").status_code == 401
        assert httpx.get(f"{running.url}/health").status_code == 200  # no key needed
        long = {"prompt": "hello", "max_tokens": 300, "min_tokens": 300}
        with ThreadPoolExecutor(4) as pool:
            codes = [f.result().status_code for f in [pool.submit(running.post, long) for _ in range(4)]]
        assert 429 in codes and 200 in codes
        # a client that goes away mid-stream: the engine drops its request at the next step; the server goes on
        endless = {"prompt": "hello", "max_tokens": 20000, "min_tokens": 20000, "stream": True}
        with httpx.stream("POST", f"{running.url}/v1/completions", json=endless,
                          headers=running.headers(), timeout=60) as response:
            next(response.iter_lines())
        assert running.post({"prompt": "hello", "max_tokens": 3}).status_code == 200
        text = httpx.get(f"{running.url}/metrics", headers=running.headers()).text
        samples = {(s.name, s.labels.get("outcome")): s.value for f in text_string_to_metric_families(text)
                   for s in f.samples}
        assert samples[("xmtf_dropped_requests_total", None)] >= 1 and samples[("xmtf_requests_total", "queue_full")] >= 1
    with Running(bloom_export, Limits(request_timeout=0.05)) as running:
        response = running.post({"prompt": "hello", "max_tokens": 400, "min_tokens": 400})
        assert response.status_code == 504 and "dropped" in response.json()["error"]["message"]
        assert running.post({"prompt": "hello", "max_tokens": 1}).status_code in (200, 504)


def test_loadtest_against_a_running_server(bloom_export, tmp_path):
    from xmtf_onnx.benchmarks.loadtest import main as loadtest

    with Running(bloom_export) as running:
        assert loadtest([running.url, "--concurrency", "1,4", "--requests", "8", "--max-tokens", "4",
                         "--offline", str(bloom_export), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "loadtest.json").read_text())
    assert [row["concurrency"] for row in report["levels"]] == [1, 4]
    for row in report["levels"]:
        assert row["error_rate"] == 0 and row["rate_429"] == 0 and row["wrong_length"] == 0
        assert row["tokens_per_second"] > 0 and row["ttft_p50"] is not None
    assert report["offline"]["batch16_tokens_per_second"] > 0
    assert "| clients |" in (tmp_path / "loadtest.md").read_text() and (tmp_path / "loadtest.png").exists()
    with Running(bloom_export) as running:  # sampled requests, a seed each
        assert loadtest([running.url, "--concurrency", "4", "--requests", "8", "--max-tokens", "4",
                         "--temperature", "0.8", "--top-p", "0.9", "--out", str(tmp_path / "sampled")]) == 0
    report = json.loads((tmp_path / "sampled" / "loadtest.json").read_text())
    assert report["sampling"] == {"temperature": 0.8, "seed": 0, "top_p": 0.9}
    assert report["levels"][0]["error_rate"] == 0 and report["levels"][0]["wrong_length"] == 0
    assert "sampled at temperature 0.8, top-p 0.9" in (tmp_path / "sampled" / "loadtest.md").read_text()
    with pytest.raises(SystemExit):
        loadtest(["http://example.com:8000"])  # localhost only
    with pytest.raises(SystemExit):
        loadtest(["http://127.0.0.1:8000", "--top-p", "0.9"])  # top-p without a temperature


def test_a_short_request_joins_a_running_batch_and_leaves_first(served):
    """Continuous batching: a request arriving mid-generation joins the running batch, finishes before the long
    one, and both get what generate() gives them alone."""
    running, model = served
    prompts = sample_prompts(2)
    # long enough (500 of the server's 512) that the short one's round trip cannot outlast it on a fast machine
    long, short = {"prompt": prompts[0], "max_tokens": 500, "min_tokens": 500}, {"prompt": prompts[1], "max_tokens": 3}
    started, finished = threading.Event(), {}
    pieces = []

    def stream_long():
        with httpx.stream("POST", f"{running.url}/v1/completions", json=dict(long, stream=True), timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    pieces.extend(c["text"] for c in json.loads(line[6:])["choices"])
                    started.set()
        finished["long"] = time.monotonic()

    thread = threading.Thread(target=stream_long)
    thread.start()
    assert started.wait(30)
    answer = running.post(short).json()["choices"][0]
    finished["short"] = time.monotonic()
    thread.join(60)
    assert finished["short"] < finished["long"]  # it did not wait for the long request to end
    assert answer["token_ids"] == model.generate(prompts[1], max_new_tokens=3).sequences[0]
    assert "".join(pieces) == model.generate(prompts[0], max_new_tokens=500, min_new_tokens=500).texts[0]


@pytest.mark.slow
def test_ray_serve_replica_answers_like_generate(bloom_export):
    """The same app on Ray Serve (one replica, its own model): ready, and a completion equals generate()."""
    ray = pytest.importorskip("ray", reason="the ray extra is part of dev; without it this test cannot run")
    from ray import serve

    from xmtf_onnx.runtime.serve.ray_app import deployment

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(str(bloom_export), threads=1, name="m"), name="xmtf", route_prefix="/")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        body = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "Hello there", "max_tokens": 6},
                          timeout=60).json()
        assert body["choices"][0]["token_ids"] == load(bloom_export).generate("Hello there", max_new_tokens=6).sequences[0]
    finally:
        serve.shutdown()
        ray.shutdown()


def test_soak_mixed_requests_with_hang_ups_each_equal_generate_alone(served, tmp_path):
    """The load test's soak: mixed lengths and options, streamed or not, clients hanging up mid-stream, from
    8 clients at once; every answer equals generate() of its request alone, none lost or duplicated."""
    from xmtf_onnx.benchmarks.loadtest import main as loadtest

    running, model = served
    assert loadtest([running.url, "--concurrency", "8", "--soak", "80", "--offline", running.server.folder,
                     "--out", str(tmp_path)]) == 0
    soak = json.loads((tmp_path / "soak.json").read_text())["soak"]
    assert soak["answered"] + soak["hung_up"] == 80 and soak["errors"] == 0 and soak["mismatched"] == 0
    assert soak["hung_up"] > 0 and soak["duplicate_ids"] == 0
    assert {"sample_n2", "beams", "stop", "greedy"} <= set(soak["answered_by_kind"])  # the mix really ran
    assert soak["rss_mb"] and "server RSS" in (tmp_path / "soak.md").read_text()


def test_the_two_machine_ray_config_is_a_valid_serve_deploy_file():
    """docs/serve/ray-two-machines.yaml (the README's cluster config) parses as Ray Serve's deploy schema and
    its args build the deployment: one replica per machine, each asking for the machine's cores."""
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema

    from xmtf_onnx.runtime.serve.ray_app import build

    path = Path(__file__).resolve().parents[1] / "docs" / "serve" / "ray-two-machines.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (application,) = config.applications
    assert application.import_path == "xmtf_onnx.runtime.serve.ray_app:build"
    bound = build(application.args)
    options = bound._bound_deployment._deployment_config
    assert options.num_replicas == 2 and bound._bound_deployment.ray_actor_options["num_cpus"] == 16
    with pytest.raises(ValueError, match="batching must be one of exact, padded"):
        build(dict(application.args, batching="fast"))

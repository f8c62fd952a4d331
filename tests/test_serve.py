"""The OpenAI-compatible server (nanojax/serve/) end to end: a real uvicorn server on a loopback port
in this process, the real continuous-batching engine over a tiny random model with a char
tokenizer, and the real `openai` client. Oracles: nj.generate + decode for greedy text,
log_softmax(nj.forward) for logprobs, transformers' apply_chat_template for chat templates."""

import json
import threading
import time

import httpx
import jax
import numpy as np
import pytest
from conftest import np_params

import nanojax as nj
from nanojax.infer.scheduler import Engine, QueueFull, SamplingParams
from nanojax.serve import ChatTemplate, create_app
from nanojax.tokenizer import CharTokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
MODEL = "tiny"
SLOTS, MAX_QUEUE = 2, 4


class _Served:
    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def served():
    tok = CharTokenizer(CHARS)
    cfg = nj.ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, max_seq_len=128)
    params = np_params(cfg, 0)
    engine = Engine(params, cfg, tok, slots=SLOTS, max_queue=MAX_QUEUE, chunk_size=4)
    s = _Served(create_app(engine, tok, MODEL))
    s.engine, s.tok, s.cfg, s.params = engine, tok, cfg, params
    s.client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
    yield s
    s.stop()


def _greedy(s, ids, n):
    return s.tok.decode(list(nj.generate(s.params, s.cfg, [ids], max_new_tokens=n, temperature=0.0)[0]))


def test_models_health_metrics(served):
    assert [m.id for m in served.client.models.list().data] == [MODEL]
    assert httpx.get(served.url + "/health").status_code == 200
    served.client.completions.create(model=MODEL, prompt="AB", max_tokens=3, temperature=0)
    r = httpx.get(served.url + "/metrics")
    stats = served.engine.stats()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = dict(line.rsplit(" ", 1) for line in r.text.splitlines() if not line.startswith("#"))
    assert samples["nanojax_slots"] == str(SLOTS)
    assert int(samples["nanojax_requests_total"]) == stats["requests_total"] >= 1
    assert int(samples["nanojax_generated_tokens_total"]) == stats["tokens_total"] >= 2
    for name in ("nanojax_queue_length", "nanojax_tokens_per_second", "nanojax_batch_occupancy",
                 "nanojax_prefix_cache_hits_total", "nanojax_requests_running"):
        assert name in samples


def test_completions_greedy_equals_generate(served):
    prompt = "ROMEO:"
    want = _greedy(served, served.tok.encode(prompt), 16)
    r = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 16)
    # streaming: the chunks concatenate to the same text; include_usage adds a last usage chunk
    chunks = list(served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert len([c for c in chunks if c.choices]) > 1  # it really streamed
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    # a prompt given as token ids
    ids = served.tok.encode("JULIET:")
    r = served.client.completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=0)
    assert r.choices[0].text == _greedy(served, ids, 16)


def test_n_choices_use_seed_plus_i(served):
    kw = dict(model=MODEL, prompt="To be", max_tokens=12, temperature=1.0)
    r = served.client.completions.create(n=3, seed=7, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 36  # the prompt counted once
    alone = [served.client.completions.create(seed=7 + i, **kw).choices[0].text for i in range(3)]
    assert [c.text for c in r.choices] == alone
    assert len(set(alone)) > 1  # the seeds differ, so (almost surely) do the samples


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_completion_logprobs_match_forward(served):
    prompt = "KING:"
    r = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    text = r.choices[0].text
    ids = served.tok.encode(prompt + text)
    ref = _log_softmax(np.asarray(nj.forward(served.params, jax.numpy.asarray([ids]), served.cfg))[0])
    n0 = len(prompt)
    assert lp.tokens == list(text) and len(lp.token_logprobs) == 6
    want = [ref[n0 - 1 + i, ids[n0 + i]] for i in range(6)]
    np.testing.assert_allclose(lp.token_logprobs, want, atol=2e-4)
    for i, top in enumerate(lp.top_logprobs):
        best = np.argsort(-ref[n0 - 1 + i])[:3]
        assert list(top) == [served.tok.decode([int(t)]) for t in best]
        np.testing.assert_allclose(list(top.values()), ref[n0 - 1 + i, best], atol=2e-4)
    assert lp.text_offset == [n0 + i for i in range(6)]


def test_chat_greedy_stream_and_logprobs(served):
    messages = [{"role": "system", "content": "Hi."}, {"role": "user", "content": "Who?"}]
    text = ChatTemplate.default().render(messages)
    assert text == "system: Hi.\nuser: Who?\nassistant:"
    want = _greedy(served, served.tok.encode(text), 16)
    r = served.client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=16,
                                              temperature=0, logprobs=True, top_logprobs=2)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == want and c.finish_reason == "length"
    assert [e.token for e in c.logprobs.content] == list(want)
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token for e in c.logprobs.content)
    assert c.logprobs.content[0].bytes == list(want[0].encode())
    stream = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                                   temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string(served):
    full = served.client.completions.create(model=MODEL, prompt="Say", max_tokens=30, temperature=0)
    stop = full.choices[0].text[5:7]
    cut = full.choices[0].text.find(stop)
    r = served.client.completions.create(model=MODEL, prompt="Say", max_tokens=30, temperature=0, stop=[stop],
                                         user="me", presence_penalty=0, extra_body={"unknown": 1})  # ignored
    assert r.choices[0].text == full.choices[0].text[:cut] and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, status, param, words", [
    ({"model": "gpt-4", "prompt": "A"}, 404, "model", "does not exist"),
    ({"model": MODEL, "prompt": "A" * 200, "max_tokens": 4}, 400, "prompt", "context"),
    ({"model": MODEL, "prompt": "A", "max_tokens": 128}, 400, "max_tokens", "at most 127"),
    ({"model": MODEL, "prompt": "A", "temperature": -1}, 400, "temperature", "greater than or equal"),
    ({"model": MODEL, "prompt": "A", "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"model": MODEL, "prompt": "A", "n": 0}, 400, "n", "greater than or equal to 1"),
    ({"model": MODEL}, 400, "prompt", "missing"),
    ({"model": MODEL, "prompt": "A~"}, 400, "prompt", "vocabulary"),
    ({"model": MODEL, "prompt": [1, 9999]}, 400, "prompt", "outside the vocabulary"),
    ({"model": MODEL, "prompt": "A", "frequency_penalty": 0.5}, 400, "frequency_penalty", "not supported"),
])
def test_bad_requests(served, body, status, param, words):
    r = httpx.post(served.url + "/v1/completions", json=body)
    err = r.json()["error"]
    assert r.status_code == status, err
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert words in err["message"]


def test_malformed_json_and_openai_client_errors(served):
    r = httpx.post(served.url + "/v1/completions", content=b'{"model": "tiny", "prompt": ',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        served.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "a"}])
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}],
                                              top_logprobs=2)


def _running(s):
    return s.engine.stats()["requests_running"]


def test_queue_full_is_429(served):
    long = SamplingParams(max_tokens=120, temperature=0.0)
    held = [served.engine.submit([1, 2, 3], long) for _ in range(SLOTS)]
    try:
        deadline = time.monotonic() + 30
        while served.engine.stats()["active_slots"] < SLOTS:  # both slots busy for 120 tokens
            assert time.monotonic() < deadline
            time.sleep(0.001)
        with pytest.raises(QueueFull):
            for _ in range(MAX_QUEUE + 1):
                held.append(served.engine.submit([1, 2, 3], long))
        r = httpx.post(served.url + "/v1/completions", json={"model": MODEL, "prompt": "A", "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert r.headers["retry-after"] == "1"
    finally:
        for h in held:
            h.cancel()
    deadline = time.monotonic() + 10
    while _running(served) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _running(served) == 0


def test_disconnect_mid_stream_frees_the_slot(served):
    before = served.engine.stats()["tokens_total"]
    body = {"model": MODEL, "prompt": "A", "max_tokens": 120, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", served.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"]
    # the connection is closed: the request is cancelled long before its 120 tokens
    deadline = time.monotonic() + 10
    while _running(served) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert _running(served) == 0
    assert served.engine.stats()["tokens_total"] - before < 100


def test_hf_chat_template_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    # written over several lines, as real templates are: trim_blocks/lstrip_blocks matter
    template = ("{{ bos_token }}\n{% for m in messages %}\n"
                "  {% if m['role'] == 'user' and not loop.first"
                " and messages[loop.index0 - 1]['role'] == 'user' %}\n"
                "    {{ raise_exception('roles must alternate user/assistant') }}\n  {% endif %}\n"
                "<|{{ m['role'] }}|>\n{{ m['content'] | trim }}{{ eos_token }}\n"
                "{% endfor %}\n{% if add_generation_prompt %}\n<|assistant|>\n{% endif %}")
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "hi": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>")
    hf.chat_template = template
    hf.save_pretrained(tmp_path)
    ours = ChatTemplate.from_dir(tmp_path)
    msgs = [{"role": "system", "content": "Be kind. "}, {"role": "user", "content": " hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    for gen in (True, False):
        want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert ours.render(msgs, gen) == want
    # the template's raise_exception is a 400 with its message
    from fastapi.testclient import TestClient

    tok = CharTokenizer(CHARS)
    app = create_app(object(), tok, MODEL, chat_template=ours, max_context=64, manage_engine=False)
    r = TestClient(app).post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    assert r.status_code == 400 and "roles must alternate" in r.json()["error"]["message"]


_SERVE_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import nanojax as nj
from conftest import np_params
from nanojax.infer.scheduler import Engine
from nanojax.serve import create_app
from nanojax.serve.server import serve
from nanojax.tokenizer import CharTokenizer
tok = CharTokenizer({chars!r})
cfg = nj.ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, max_seq_len=128)
engine = Engine(np_params(cfg, 0), cfg, tok, slots=2, chunk_size=1)
serve(create_app(engine, tok, "tiny", manage_engine=False), engine, port={port}, drain_timeout=30)
print("clean exit")
"""


def test_sigint_drains_running_stream_then_exits_0(tmp_path):
    """Ctrl-C with a stream running: the stream still gets every token and [DONE], new connections
    are refused, and the process exits 0 (nanojax/serve/server.py)."""
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = _SERVE_SCRIPT.format(tests=str(Path(__file__).parent), chars=CHARS, port=port)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        body = {"model": MODEL, "prompt": "A", "max_tokens": 120, "temperature": 0, "stream": True}
        text, finish, at_signal = "", None, None
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    text += "[DONE]"
                elif line.startswith("data: "):
                    choice = json.loads(line[6:])["choices"][0]
                    text, finish = text + choice["text"], choice["finish_reason"] or finish
                    if at_signal is None:
                        at_signal = len(text)
                        proc.send_signal(signal.SIGINT)
                        time.sleep(0.2)
                        with pytest.raises(httpx.ConnectError):
                            httpx.get(url + "/health")
        assert at_signal < 120 and len(text) == 120 + len("[DONE]") and finish == "length"
        assert proc.wait(timeout=60) == 0
        assert "clean exit" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stopped_engine_is_503():
    from fastapi.testclient import TestClient

    tok = CharTokenizer(CHARS)
    cfg = nj.ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=32)
    engine = Engine(np_params(cfg, 0), cfg, tok, slots=1)
    engine.shutdown()
    r = TestClient(create_app(engine, tok, MODEL, manage_engine=False)).post(
        "/v1/completions", json={"model": MODEL, "prompt": "A", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped"


@pytest.mark.slow  # a subprocess that imports, compiles and runs the whole bench (~13 s)
def test_bench_serve_preset_end_to_end(tmp_path):
    """scripts/bench_serve.py --preset serves a random-init model of that preset's shape (here
    llama-tiny: RoPE, GQA, SwiGLU; 2 layers) with the char vocabulary, and its own oracle holds:
    every concurrent greedy completion is complete and equals the same request served alone."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = tmp_path / "t.txt"
    text.write_text("ROMEO: But soft, what light through yonder window breaks? " * 40)
    cmd = [sys.executable, str(root / "scripts/bench_serve.py"), "--preset=llama-tiny", "--max_seq_len=64",
           "--slots=2", "--clients=3", "--min_prompt=4", "--max_prompt=12", "--min_new=4", "--max_new=10",
           "--prefix_len=32", "--prefix_trials=1", f"--text={text}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "model: llama-tiny, 2 layers, d_model 64, vocab 65, context 64" in out, out[-3000:]
    assert "correct and complete: 3/3" in out and "MISMATCH" not in out, out[-3000:]
    assert "throughput ratio" in out and "median cold" in out, out[-3000:]

"""The label server without a browser (urllib against a server on a free port, in a thread): many
raters at once lose and interleave nothing, a restart resumes each rater, bad input is refused with
the log untouched, an unwritable log is reported before the first decision; sampled pairs are
label.py's; the chat page answers as sample --chat does. Then both pages in headless Chromium,
where it is installed."""

import contextlib
import io
import json
import shutil
import threading
import urllib.error
import urllib.request

import pytest

from nanoalign import label, sample, serve


def write_pairs(path, n=12):
    """A preference file of n pairs whose chosen answer the gold judge also prefers."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"question {i}?", "chosen": f"good answer {i}",
                                "rejected": f"bad answer {i}", "gold_chosen": 1.0,
                                "gold_rejected": 0.0}) + "\n")
    return str(path)


@contextlib.contextmanager
def running(pairs_file, log, n=100, chat=None):
    server = serve.make_server(serve.open_labels(label.pairs_from_file(pairs_file, n), str(log)),
                               chat=chat)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def call(url, body=None, raw=None, headers=()):
    """(HTTP status, JSON reply) of a GET, or of a POST of body (as JSON) or raw bytes."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json", **dict(headers)})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def label_all(base, rater, pick):
    """Decide every pair the server offers this rater; pick(state) -> choice. [progress seen]."""
    status, state = call(f"{base}/next?rater={rater}")
    seen = [state["done"]]
    while state["pair"]:
        status, state = call(f"{base}/decide", {"rater": rater, "pair": state["pair"]["id"],
                                                "choice": pick(state)})
        assert status == 200, state
        seen.append(state["done"])
    return seen


def prefers_good(state):
    return "A" if state["pair"]["A"].startswith("good") else "B"


def test_four_raters_at_once_each_decide_every_pair_once_and_no_line_is_lost(tmp_path):
    pairs, log = write_pairs(tmp_path / "pairs.jsonl", 30), tmp_path / "labels.log.jsonl"
    cycle = ["A", "B", "tie", "skip"]
    picks = {"ada": prefers_good, "bob": lambda s: cycle[int(s["pair"]["prompt"][0]["content"]
                                                              .split()[1][:-1]) % 4],
             "cy": prefers_good, "dee": lambda s: "B"}
    progress = {}
    threads = [threading.Thread(target=lambda r=r, p=p: progress.update({r: label_all(base, r, p)}))
               for r, p in picks.items()]
    with running(pairs, log) as base:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # progress went 0, 1, ..., 30 for each rater, whatever the others did meanwhile
    assert progress == {r: list(range(31)) for r in picks}
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole: none interleaved
    assert len(records) == 4 * 30
    assert len({(d["rater"], d["pair"]) for d in records}) == 4 * 30
    for d in records:
        good = d["answers"][0].startswith("good")
        # A and B name the file's side that was shown there, and gold follows the shown order
        assert (d["A"], d["B"]) == (("chosen", "rejected") if good else ("rejected", "chosen"))
        assert d["gold"] == ([1.0, 0.0] if good else [0.0, 1.0])
        if d["rater"] in ("ada", "cy"):
            assert d["answers"][0 if d["choice"] == "A" else 1].startswith("good")
    # A/B order is each rater's own: both orders occur, and two raters differ on some pair
    firsts = {(d["rater"], d["pair"]): d["A"] for d in records}
    assert {d["A"] for d in records} == {"chosen", "rejected"}
    assert any(firsts[("ada", p)] != firsts[("cy", p)] for _, p in firsts)


def test_a_restart_resumes_each_rater_with_the_next_pair_they_have_not_decided(tmp_path):
    pairs, log = write_pairs(tmp_path / "pairs.jsonl"), tmp_path / "labels.log.jsonl"
    with running(pairs, log) as base:
        offered = []
        for _ in range(3):
            state = call(f"{base}/next?rater=ada")[1]
            offered.append(state["pair"]["id"])
            assert call(f"{base}/decide", {"rater": "ada", "pair": offered[-1],
                                           "choice": "tie"})[0] == 200
        bob_first = call(f"{base}/next?rater=bob")[1]["pair"]
        call(f"{base}/decide", {"rater": "bob", "pair": bob_first["id"], "choice": "A"})
        fourth = call(f"{base}/next?rater=ada")[1]["pair"]
    with running(pairs, log) as base:
        ada, bob = call(f"{base}/next?rater=ada")[1], call(f"{base}/next?rater=bob")[1]
        new = call(f"{base}/next?rater=eve")[1]
    assert len(set(offered)) == 3 and (ada["done"], bob["done"], new["done"]) == (3, 1, 0)
    assert ada["pair"] == fourth  # same pair, same A/B order as before the restart
    assert bob["pair"]["id"] == offered[1] and new["pair"]["id"] == offered[0]


def test_bad_input_is_refused_with_a_message_and_the_log_untouched(tmp_path):
    pairs, log = write_pairs(tmp_path / "pairs.jsonl"), tmp_path / "labels.log.jsonl"
    with running(pairs, log) as base:
        pid = call(f"{base}/next?rater=ada")[1]["pair"]["id"]
        assert call(f"{base}/decide", {"rater": "ada", "pair": pid, "choice": "A"})[0] == 200
        before = log.read_bytes()
        cases = {"unknown pair": {"rater": "ada", "pair": "nope", "choice": "A"},
                 "empty": {"rater": "", "pair": pid, "choice": "A"},
                 "name": {"rater": "   ", "pair": pid, "choice": "A"},
                 "must be one of": {"rater": "bob", "pair": pid, "choice": "C"},
                 "JSON object": ["ada", pid, "A"]}
        for message, body in cases.items():
            status, reply = call(f"{base}/decide", body)
            assert status == 400 and message in reply["error"], (body, reply)
        status, reply = call(f"{base}/decide", raw=b'{"rater": "ada", "pair": ')
        assert status == 400 and "not valid JSON" in reply["error"]
        status, reply = call(f"{base}/next?rater=")
        assert status == 400 and "name" in reply["error"]
        status, reply = call(f"{base}/decide", raw=b" " * (serve.MAX_BODY + 1))
        assert status == 413 and "over" in reply["error"]
        # the same decision twice (a double click) is not logged twice
        status, reply = call(f"{base}/decide", {"rater": "ada", "pair": pid, "choice": "B"})
        assert status == 409 and "already decided" in reply["error"]
        # what another site's page could send without asking the browser first (CSRF), and a
        # page reaching the server under another site's name (DNS rebinding)
        bob = {"rater": "bob", "pair": pid, "choice": "A"}
        status, reply = call(f"{base}/decide", bob, headers={"Content-Type": "text/plain"})
        assert status == 415 and "application/json" in reply["error"]
        status, reply = call(f"{base}/decide", bob, headers={"Host": "attacker.example:8000"})
        assert status == 403 and "own address" in reply["error"]
        assert log.read_bytes() == before


def test_a_restart_after_an_empty_or_half_written_log_still_starts(tmp_path):
    """Opening the page creates the log empty; a crash can leave half a line: neither may stop
    the next start, and the whole decisions before it still count."""
    pairs, log = write_pairs(tmp_path / "pairs.jsonl", 3), tmp_path / "labels.log.jsonl"
    log.write_text("")
    with running(pairs, log) as base:
        pid = call(f"{base}/next?rater=ada")[1]["pair"]["id"]
        assert call(f"{base}/decide", {"rater": "ada", "pair": pid, "choice": "A"})[0] == 200
    with open(log, "a") as f:
        f.write('{"pair": "half')
    with pytest.warns(UserWarning, match="skipped 1 bad record"):
        with running(pairs, log) as base:
            state = call(f"{base}/next?rater=ada")[1]
            assert state["done"] == 1
            assert call(f"{base}/decide", {"rater": "ada", "pair": state["pair"]["id"],
                                           "choice": "B"})[0] == 200
    last = json.loads(log.read_text().splitlines()[-1])  # not glued to the half line
    assert (last["rater"], last["pair"], last["choice"]) == ("ada", state["pair"]["id"], "B")


def test_an_unwritable_log_is_reported_before_the_first_decision(tmp_path):
    pairs, log = write_pairs(tmp_path / "pairs.jsonl"), tmp_path / "a_directory"
    log.mkdir()  # root writes anywhere: a directory in the log's place fails for everyone
    with running(pairs, log) as base:
        status = call(f"{base}/status")[1]
        pid = call(f"{base}/next?rater=ada")[1]["pair"]["id"]
        code, reply = call(f"{base}/decide", {"rater": "ada", "pair": pid, "choice": "A"})
        progress = call(f"{base}/next?rater=ada")[1]["done"]
    assert status["writable"] is False and "cannot write the log" in status["error"]
    assert code == 500 and "not saved" in reply["error"] and progress == 0


def test_sampled_pairs_are_label_pys_answers_under_stable_ids(micro_run):
    ckpt = str(micro_run / "sft" / "ckpt.pt")
    argv = ["--ckpt", ckpt, "--prompts", str(micro_run / "world" / "prompts_rl.jsonl"),
            "--n", "3", "--max_new_tokens", "12", "--device", "cpu"]
    cfg = serve.config.parse_config(serve.ServeConfig, argv)
    pairs = label.pairs_from_models(cfg)
    tok, models, sources = label.load_models(cfg, "cpu")
    prompts = label.load_prompts(cfg.prompts)
    for p in pairs:
        answers = label.two_answers(models, tok, prompts[p["index"]], p["index"], cfg, "cpu")
        assert p["answers"] == answers and p["models"] == [ckpt, ckpt]
        assert p["id"] == label.pair_id(prompts[p["index"]], answers[::-1])
    assert [p["id"] for p in label.pairs_from_models(cfg)] == [p["id"] for p in pairs]


def test_main_loads_each_model_once_and_serves_both_pages_with_their_style(micro_run, tmp_path,
                                                                          monkeypatch):
    loads, served = [], {}
    real_load = label.load_model
    monkeypatch.setattr(label, "load_model", lambda path, device: loads.append(path)
                        or real_load(path, device))

    real_make = serve.make_server

    def make_server(*args):
        server = real_make(*args)
        forever = server.serve_forever

        def fetch_then_stop():  # stands in for serve_forever: fetch the pages, stop as Ctrl-C does
            threading.Thread(target=forever, daemon=True).start()
            base = f"http://127.0.0.1:{server.server_address[1]}"
            for path in ("/", "/chat", "/style.css"):
                with urllib.request.urlopen(base + path, timeout=30) as r:
                    served[path] = (r.headers.get_content_type(), r.read().decode())
            server.shutdown()
            raise KeyboardInterrupt

        server.serve_forever = fetch_then_stop
        return server

    monkeypatch.setattr(serve, "make_server", make_server)
    ppo, sft = str(micro_run / "ppo" / "ckpt.pt"), str(micro_run / "sft" / "ckpt.pt")
    serve.main(["--ckpt", ppo, "--compare", sft, "--n", "2", "--max_new_tokens", "8",
                "--prompts", str(micro_run / "world" / "prompts_rl.jsonl"), "--port", "0",
                "--log", str(tmp_path / "log.jsonl"), "--device", "cpu"])
    assert loads == [ppo, sft]  # the label page's pairs and the chat page share one load
    assert [served[p][0] for p in ("/", "/chat", "/style.css")] == ["text/html"] * 2 + ["text/css"]
    assert all('href="/style.css"' in served[p][1] for p in ("/", "/chat"))
    assert "[hidden]" in served["/style.css"][1]  # the rule both pages' scripts rely on


def test_serve_help_lists_each_flag_once(capsys):
    with pytest.raises(SystemExit):
        serve.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--pairs", "--ckpt", "--log", "--host", "--port"):
        assert out.count(f"  {flag} ") == 1, flag
    with pytest.raises(SystemExit):
        serve.main(["--pairs", "x.jsonl", "--ckpt", "y.pt"])
    assert "either --pairs" in capsys.readouterr().err


def browser_missing() -> str:
    """Why the browser test cannot run here ('' = it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return "chromium or chromedriver is missing (apt-get install chromium chromium-driver)"
    return ""


def chromium():
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,800"):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=options, service=service)


@pytest.mark.skipif(bool(browser_missing()), reason=browser_missing() or "-")
def test_the_label_page_in_headless_chromium(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pairs, log = write_pairs(tmp_path / "pairs.jsonl", 5), tmp_path / "labels.log.jsonl"
    driver = chromium()
    try:
        with running(pairs, log) as base:
            driver.get(base)
            wait = WebDriverWait(driver, 20)
            progress = lambda: driver.find_element(By.ID, "progress").text
            wait.until(lambda d: progress() == "0 / 5")
            driver.find_element(By.ID, "rater").send_keys("ada\n")
            wait.until(lambda d: d.find_element(By.ID, "task").is_displayed())
            shown_a = driver.find_element(By.ID, "A").text
            driver.find_element(By.TAG_NAME, "body").send_keys("a")
            wait.until(lambda d: progress() == "1 / 5")
            assert driver.find_element(By.ID, "error").is_displayed() is False
    finally:
        driver.quit()
    [d] = [json.loads(line) for line in log.read_text().splitlines()]
    assert (d["rater"], d["choice"], d["answers"][0]) == ("ada", "A", shown_a)


# ------------------------------------------------------------ the chat page
def open_chat(micro_run, seed=3):
    """The chat models of `serve --ckpt ppo --compare sft` (short answers, a fixed seed)."""
    argv = ["--ckpt", str(micro_run / "ppo" / "ckpt.pt"), "--compare",
            str(micro_run / "sft" / "ckpt.pt"), "--max_new_tokens", "16", "--seed", str(seed),
            "--device", "cpu"]
    return serve.open_chat(serve.config.parse_config(serve.ServeConfig, argv))


def test_two_turns_with_both_models_are_the_answers_of_sample_chat(micro_run, tmp_path, capsys,
                                                                    monkeypatch):
    pairs, log, chat = write_pairs(tmp_path / "pairs.jsonl"), tmp_path / "log", open_chat(micro_run)
    said = {"ckpt": [], "compare": []}
    with running(pairs, log, chat=chat) as base:
        settings = call(f"{base}/chat/settings")[1]
        conversations = {name: [] for name in said}
        for text in ("Tell me a story about a cat.", "And then what happened?"):
            for name, messages in conversations.items():
                messages.append({"role": "user", "content": text})
                # the second request carries this model's own first answer
                status, reply = call(f"{base}/chat", {"messages": messages, "model": name})
                assert status == 200 and reply["model"] == name, reply
                messages.append({"role": "assistant", "content": reply["answer"]})
                said[name].append(reply["answer"])
    assert settings == {"models": chat.shown["models"], "temperature": 1.0, "seed": 3,
                        "max_new_tokens": 16}
    assert all(answer.strip() for answers in said.values() for answer in answers), said
    # the same two turns typed into `sample --chat` (its own load, same settings and seed)
    cfg = sample.SampleConfig(max_new_tokens=16, seed=3)
    models = {name: sample.load(path, "cpu") for name, path in settings["models"].items()}
    monkeypatch.setattr("sys.stdin", io.StringIO("Tell me a story about a cat.\n"
                                                 "And then what happened?\n\n"))
    assert sample.chat_loop(models, cfg, "cpu") == said
    # and sample.reply on the whole conversation gives the last answer again
    tok, model = models["compare"][1:]
    assert sample.reply(model, tok, conversations["compare"][:-1], cfg, "cpu") == said["compare"][1]


def test_bad_chat_requests_are_refused_with_a_message(micro_run, tmp_path):
    pairs, log = write_pairs(tmp_path / "pairs.jsonl"), tmp_path / "log"
    hi = {"role": "user", "content": "hi"}
    cases = {"JSON object": [hi],
             "model must be one of": {"messages": [hi], "model": "gpt-5"},
             "non-empty list": {"messages": [], "model": "ckpt"},
             "list of": {"messages": "hi", "model": "compare"},
             "each one": {"messages": [{"role": "user"}], "model": "ckpt"},
             "user|assistant": {"messages": [{"role": "system", "content": "x"}, hi],
                                "model": "ckpt"},
             "content: text": {"messages": [{"role": "user", "content": 3}], "model": "ckpt"},
             "end with a user turn": {"messages": [hi, {"role": "assistant", "content": "yo"}],
                                      "model": "ckpt"}}
    with running(pairs, log, chat=open_chat(micro_run)) as base:
        for message, body in cases.items():
            status, reply = call(f"{base}/chat", body)
            assert status == 400 and message in reply["error"], (body, reply)
        status, reply = call(f"{base}/chat", raw=b'{"messages": [')
        assert status == 400 and "not valid JSON" in reply["error"]
        status, reply = call(f"{base}/chat", raw=b" " * (serve.MAX_BODY + 1))
        assert status == 413 and "over" in reply["error"]
    # --pairs only: no model to chat with, and the page says what is missing
    with running(pairs, log) as base:
        with pytest.raises(urllib.error.HTTPError) as page:
            urllib.request.urlopen(f"{base}/chat", timeout=30)
        assert page.value.code == 404 and "--ckpt" in page.value.read().decode()
        for status, reply in (call(f"{base}/chat/settings"),
                              call(f"{base}/chat", {"messages": [hi], "model": "ckpt"})):
            assert status == 404 and "--ckpt" in reply["error"]


@pytest.mark.skipif(bool(browser_missing()), reason=browser_missing() or "-")
def test_the_chat_page_in_headless_chromium(micro_run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pairs, log = write_pairs(tmp_path / "pairs.jsonl"), tmp_path / "log"
    driver = chromium()
    try:
        with running(pairs, log, chat=open_chat(micro_run)) as base:
            driver.get(f"{base}/chat")
            wait = WebDriverWait(driver, 30)
            wait.until(lambda d: "seed 3" in d.find_element(By.ID, "settings").text)
            answered = lambda n: lambda d: all(
                len(d.find_elements(By.CSS_SELECTOR, f"#pane-{m} .assistant:not(.pending)")) == n
                for m in ("ckpt", "compare"))
            for n, text in enumerate(("Tell me a story about a cat.", "And then?"), 1):
                driver.find_element(By.ID, "message").send_keys(text + "\n")
                wait.until(answered(n))
            turns = {m: [e.text for e in driver.find_elements(By.CSS_SELECTOR, f"#pane-{m} .turn")]
                     for m in ("ckpt", "compare")}
            assert driver.find_element(By.ID, "error").is_displayed() is False
            driver.save_screenshot(str(tmp_path / "chat-page.png"))
    finally:
        driver.quit()
    for shown in turns.values():
        assert [t.split(":")[0] for t in shown] == ["user", "assistant"] * 2
        assert shown[0] == "user: Tell me a story about a cat." and shown[1] != "assistant: "

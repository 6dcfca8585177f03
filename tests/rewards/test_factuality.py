"""The factuality reward: labelled short answers, payoffs, metrics, long answers, and the judge over a local fake
OpenAI-compatible server (which also checks the API key travels only in the Authorization header)."""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rewards import RewardInput, RewardResult, load_reward
from rewards.builtin.factuality import factuality, factuality_metrics
from rewards.judge import ChatJudge, JudgeError, parse_claim_labels, parse_verdict

CASES = [json.loads(line) for line in (Path(__file__).parent / "data" / "factuality_cases.jsonl").read_text(
    encoding="utf-8").splitlines() if line.strip()]
SECRET = "sk-test-DO-NOT-LEAK-4f9a1c"
KEY_ENV = "SLIPSTREAM_TEST_JUDGE_KEY"
EIFFEL_DOCS = ["The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was completed in 1889 for the "
               "World's Fair. The tower is 330 metres tall."]


def run(coro):
    return asyncio.run(coro)


def score(response, label, prompt="What is the capital of France?", **kwargs):
    return run(factuality(RewardInput(prompt, response, label), **kwargs))


@pytest.mark.parametrize("case", CASES, ids=[c["note"] for c in CASES])
def test_labelled_cases(case):
    result = score(case["response"], case["label"], case["prompt"])
    assert result.info["verdict"] == case["expected"], result.info
    assert result.score == {"correct": 1.0, "abstained": 0.0, "incorrect": -1.0}[case["expected"]]
    assert result.components == {k: float(k == case["expected"]) for k in ("correct", "abstained", "incorrect")}


def test_labelled_set_covers_every_verdict_and_metrics_match():
    results = [score(c["response"], c["label"], c["prompt"]) for c in CASES]
    counts = {v: sum(c["expected"] == v for c in CASES) for v in ("correct", "abstained", "incorrect")}
    assert min(counts.values()) >= 5
    metrics = factuality_metrics(results)
    assert metrics["accuracy"] == pytest.approx(counts["correct"] / len(CASES))
    assert metrics["hallucination_rate"] == pytest.approx(counts["incorrect"] / (counts["incorrect"]
                                                                                 + counts["abstained"]))


def test_payoff_ordering_and_configurable_values():
    right, unsure, wrong = "Paris", "I don't know.", "Lyon"
    default = [score(r, "Paris").score for r in (right, unsure, wrong)]
    assert default == [1.0, 0.0, -1.0]
    custom = [score(r, "Paris", correct=2.0, abstain=-0.25, incorrect=-3.0).score for r in (right, unsure, wrong)]
    assert custom == [2.0, -0.25, -3.0]
    # configured through the registry, as a run config does
    fn = load_reward("factuality", {"correct": 1.0, "abstain": 0.5, "incorrect": 0.0})
    assert run(fn(RewardInput("q", unsure, "Paris"))).score == 0.5


@pytest.mark.parametrize("values", [(0.0, 0.5, -1.0), (1.0, -2.0, -1.0), (1.0, 1.0, 1.0)])
def test_payoffs_out_of_order_are_rejected(values):
    c, a, i = values
    with pytest.raises(ValueError, match="payoffs"):
        score("Paris", "Paris", correct=c, abstain=a, incorrect=i)


def test_metrics_on_known_mix():
    def r(verdict):
        return RewardResult(0.0, {k: float(k == verdict) for k in ("correct", "abstained", "incorrect")})

    results = [r("correct")] * 5 + [r("abstained")] * 2 + [r("incorrect")] * 3
    results.append(RewardResult(0.0))  # a caller's fallback result without components: not counted
    metrics = factuality_metrics(results)
    assert metrics == {"n": 10.0, "accuracy": 0.5, "abstention_rate": 0.2, "incorrect_rate": 0.3,
                       "hallucination_rate": 0.6, "omniscience_index": pytest.approx(20.0)}
    assert factuality_metrics([])["hallucination_rate"] == 0.0
    only_right = factuality_metrics([r("correct")])
    assert only_right["accuracy"] == 1.0 and only_right["hallucination_rate"] == 0.0


def test_label_formats():
    assert score("It has 8.", 8, "How many legs?").info["verdict"] == "correct"
    assert score("Paree", {"answer": ["Paris", "Paree"]}).info["verdict"] == "correct"
    with pytest.raises(ValueError, match="label"):
        score("Paris", None)
    with pytest.raises(ValueError, match="answer"):
        score("Paris", {"aliases": []})


def test_long_answer_scores_supported_claim_share():
    prompt = "Tell me about the Eiffel Tower."
    good = "The Eiffel Tower is located in Paris, France. It was completed in 1889. It is 330 metres tall."
    result = score(good, {"documents": EIFFEL_DOCS}, prompt)
    assert result.score == 1.0 and result.components["claims"] == 3.0
    mixed = ("The Eiffel Tower is located in Paris, France. It was completed in 1925. "
             "It is made of gold and was designed by Leonardo da Vinci.")
    result = score(mixed, {"documents": EIFFEL_DOCS}, prompt)
    assert result.components["supported_share"] == pytest.approx(1 / 3)
    assert result.score == pytest.approx(-1 / 3)  # share 1/3 on the -1..+1 scale
    assert result.info["unsupported_claims"] == ["It was completed in 1925.",
                                                 "It is made of gold and was designed by Leonardo da Vinci."]
    # a stricter threshold rejects the claim that uses a word ("located") the document lacks
    strict = score(good, {"documents": EIFFEL_DOCS}, prompt, support_threshold=1.0)
    assert strict.components["supported_share"] == pytest.approx(2 / 3)
    assert score("I don't know.", {"documents": EIFFEL_DOCS}, prompt).info["verdict"] == "abstained"
    assert score("Sure!", {"documents": EIFFEL_DOCS}, prompt).info["verdict"] == "abstained"


def test_long_response_with_answer_and_documents_uses_claims():
    label = {"answer": "1889", "documents": EIFFEL_DOCS}
    assert score("1889", label, "When was it completed?").info["mode"] == "short"
    long = " ".join(["The Eiffel Tower was completed in 1889 for the World's Fair."] * 12)
    assert score(long, label, "When was it completed?", max_answer_words=20).info["mode"] == "claims"


# ---------------------------------------------------------------- judge over a local fake OpenAI-compatible server


class FakeJudgeServer:
    """Chat-completions on 127.0.0.1 (ephemeral port) in a thread. Requests without `Bearer <expected_key>` get
    401; otherwise `reply` (a string, or an int status code) is answered."""

    def __init__(self, expected_key: str | None):
        self.expected_key, self.reply, self.requests = expected_key, "CORRECT", []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                        "body": body})
                if server.expected_key and self.headers.get("Authorization") != f"Bearer {server.expected_key}":
                    return self._send(401, {"error": "invalid api key"})
                if isinstance(server.reply, int):  # an error status; echo the key to test scrubbing
                    echo = f"upstream failed for {self.headers.get('Authorization')}"
                    return self._send(server.reply, {"error": echo})
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": server.reply}}]})

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_judge(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    server = FakeJudgeServer(SECRET)
    yield server
    server.close()


def judge_kwargs(server, **extra):
    return {"judge_url": server.url, "judge_model": "judge-small", "judge_api_key_env": KEY_ENV,
            "judge_max_retries": 0, **extra}


def test_judge_verdict_and_authorization(fake_judge):
    fake_judge.reply = "The response names the capital.\nVerdict: **CORRECT**"
    result = score("Paris is the one.", {"answer": "Paris", "aliases": ["City of Paris"]}, **judge_kwargs(fake_judge))
    assert result.info["verdict"] == "correct" and result.info["method"] == "judge" and result.score == 1.0
    request = fake_judge.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == f"Bearer {SECRET}"
    assert request["body"]["model"] == "judge-small"
    user = request["body"]["messages"][-1]["content"]
    assert "What is the capital of France?" in user and "City of Paris" in user and "Paris is the one." in user
    for reply, verdict in [("INCORRECT", "incorrect"), ("abstained", "abstained"), ("NOT_ATTEMPTED", "abstained")]:
        fake_judge.reply = reply
        assert score("whatever", "Paris", **judge_kwargs(fake_judge)).info["verdict"] == verdict


def test_judge_labels_long_answer_claims(fake_judge):
    fake_judge.reply = "1: SUPPORTED\n2: UNSUPPORTED"
    response = "The Eiffel Tower is in Paris, France. It was completed in 1925."
    result = score(response, {"documents": EIFFEL_DOCS}, "Tell me about it.", **judge_kwargs(fake_judge))
    assert result.components["supported_share"] == 0.5 and result.score == 0.0
    assert "[Document 1]" in fake_judge.requests[-1]["body"]["messages"][-1]["content"]


def test_judge_failures_raise_clear_errors(fake_judge, monkeypatch):
    fake_judge.reply = "I cannot decide."
    with pytest.raises(JudgeError, match="no CORRECT/INCORRECT/ABSTAINED verdict"):
        score("Paris", "Paris", **judge_kwargs(fake_judge))
    fake_judge.reply = 503
    with pytest.raises(JudgeError, match="gave up after 2 attempt"):
        score("Paris", "Paris", **judge_kwargs(fake_judge, judge_max_retries=1))
    assert len(fake_judge.requests) == 3
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    with pytest.raises(JudgeError, match="HTTP 401"):
        score("Paris", "Paris", **judge_kwargs(fake_judge))
    with pytest.raises(JudgeError, match="ConnectError"):  # nothing listens on port 9 of 127.0.0.1
        score("Paris", "Paris", judge_url="http://127.0.0.1:9/v1", judge_model="m", judge_max_retries=0)
    with pytest.raises(ValueError, match="judge_model"):
        score("Paris", "Paris", judge_url=fake_judge.url)


def test_api_key_never_leaks(fake_judge, caplog):
    caplog.set_level(logging.DEBUG)  # httpx / httpcore debug logging included
    seen = []
    fake_judge.reply = "CORRECT"
    result = score("Paris", "Paris", **judge_kwargs(fake_judge))
    seen += [repr(result), json.dumps(result.info), str(result.components)]
    for reply in (500, "garbage"):  # the 500 body echoes the Authorization header back
        fake_judge.reply = reply
        with pytest.raises(JudgeError) as info:
            score("Paris", "Paris", **judge_kwargs(fake_judge))
        seen += [str(info.value), repr(info.value), "".join(traceback.format_exception(info.value))]
    assert "***" in seen[3]  # the echoed key was scrubbed, not merely absent
    judge = ChatJudge(fake_judge.url, "judge-small", KEY_ENV)
    seen += [repr(judge), str(judge.__dict__)]
    seen.append(caplog.text)
    assert fake_judge.requests and all(r["auth"] == f"Bearer {SECRET}" for r in fake_judge.requests)
    for text in seen:
        assert SECRET not in text


def test_no_authorization_header_without_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    server = FakeJudgeServer(expected_key=None)
    try:
        assert score("Paris", "Paris", **judge_kwargs(server)).score == 1.0
        assert server.requests[-1]["auth"] is None
    finally:
        server.close()


def test_verdict_and_claim_parsing():
    assert parse_verdict("INCORRECT") == "incorrect"  # not read as CORRECT
    assert parse_verdict("<think>looks CORRECT at first</think>Final: Incorrect.") == "incorrect"
    assert parse_verdict("correct") == "correct"
    assert parse_verdict("Not attempted") == "abstained"
    with pytest.raises(JudgeError):
        parse_verdict("")
    assert parse_claim_labels("1: SUPPORTED\n2) **unsupported**\n[3] Not supported", 3) == [True, False, False]
    with pytest.raises(JudgeError, match=r"\[2\]"):
        parse_claim_labels("1: SUPPORTED", 2)



# ---------------------------------------------------------------- one committed answer (docs/rewards.md, "Reward hacking")

AUSTRALIA = "What is the capital of Australia?"
HEDGES = {
    "question marks (the issue's exploit)": "Canberra? Sydney? Perth?",
    "one question mark": "Is it Canberra?",
    "comma list": "Canberra, Sydney",
    "semicolon list": "Canberra; Sydney; Perth",
    "slash list": "Canberra / Sydney",
    "one per line": "Canberra\nSydney",
    "'and' list": "Canberra and Sydney",
    "or": "Canberra or Sydney",
    "or in brackets": "Canberra (or maybe Sydney)",
    "either": "Either Canberra, either Sydney.",
    "alternatively": "Canberra. Alternatively Sydney.",
    "not X": "Not Canberra.",
    "X, not Y": "Canberra, not Sydney.",
    "Y, not X": "Sydney, not Canberra.",
    "retraction": "Sydney. Actually, Canberra.",
    "retraction back": "Canberra. No wait, Sydney.",
    "hedged pair": "Perhaps Canberra, perhaps Sydney.",
    "answer phrase with a list": "The answer is Canberra, Sydney or Perth.",
}


@pytest.mark.parametrize("answer_format", ["short", "sentence"])
@pytest.mark.parametrize("response", list(HEDGES.values()), ids=list(HEDGES))
def test_candidate_lists_in_any_form_are_not_correct(response, answer_format):
    result = score(response, "Canberra", AUSTRALIA, answer_format=answer_format)
    assert result.info["verdict"] == "incorrect", result.info
    assert result.score == -1.0


@pytest.mark.parametrize("response", ["Canberra", "Canberra.", "The capital of Australia is Canberra.",
                                      "It's Canberra, I think.", "I'm not sure, but probably Canberra.",
                                      "Canberra, no doubt.", "Final answer: Canberra", "\\boxed{Canberra}",
                                      "Canberra, Australia"])
def test_one_committed_answer_is_correct_in_both_formats(response):
    for answer_format in ("short", "sentence"):
        assert score(response, "Canberra", AUSTRALIA, answer_format=answer_format).info["verdict"] == "correct"


def test_short_format_pays_the_answer_alone_sentence_format_allows_context():
    extra = "Canberra, which was purpose-built as the capital in 1913."
    short = score(extra, "Canberra", AUSTRALIA, answer_format="short")
    assert short.info["verdict"] == "incorrect" and "answer only" in short.info["reason"]
    assert score(extra, "Canberra", AUSTRALIA, answer_format="sentence").info["verdict"] == "correct"
    # a question that itself negates may be answered with its own negation
    q = "Which of these cities is not in France?"
    assert score("Berlin is not in France.", "Berlin", q).info["verdict"] == "correct"


def test_only_the_last_final_answer_counts():
    assert score("\\boxed{Canberra} \\boxed{Sydney}", "Canberra", AUSTRALIA).info["verdict"] == "incorrect"
    assert score("Answer: Sydney. Answer: Canberra", "Canberra", AUSTRALIA).info["verdict"] == "correct"


def test_answer_format_is_validated_and_documented():
    from rewards.builtin.factuality import ANSWER_FORMATS

    assert set(ANSWER_FORMATS) == {"short", "sentence"}
    with pytest.raises(ValueError, match="answer_format"):
        score("Paris", "Paris", answer_format="essay")
    fn = load_reward("factuality", {"answer_format": "sentence"})
    assert run(fn(RewardInput(AUSTRALIA, "Canberra, a planned city.", "Canberra"))).info["verdict"] == "correct"


def test_judge_sees_the_format_and_never_sees_a_marked_hedge(fake_judge):
    from rewards.builtin.factuality import ANSWER_FORMATS

    fake_judge.reply = "CORRECT"  # a judge that a hedge could fool
    result = score("Canberra? Sydney?", "Canberra", AUSTRALIA, **judge_kwargs(fake_judge))
    assert result.info["verdict"] == "incorrect" and result.info["method"] == "lexical"
    assert fake_judge.requests == []
    result = score("Canberra, I believe.", "Canberra", AUSTRALIA, **judge_kwargs(fake_judge, answer_format="sentence"))
    assert result.info["verdict"] == "correct" and result.info["method"] == "judge"
    assert ANSWER_FORMATS["sentence"] in fake_judge.requests[-1]["body"]["messages"][0]["content"]

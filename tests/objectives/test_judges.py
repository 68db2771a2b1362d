"""The OpenAI-compatible judge against a local fake server: protocol, parsing, key handling."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from objectives import judges

KEY = "sk-test-secret-0123456789"


class FakeJudge(BaseHTTPRequestHandler):
    """Answers every chat completion with "M" at probability 0.9 (so "m" at 0.1)."""

    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.requests.append({"auth": self.headers.get("Authorization"), "body": body})
        top = [
            {"token": "M", "logprob": -0.1053605, "bytes": [77]},
            {"token": "m", "logprob": -2.3025851, "bytes": [109]},
        ]
        reply = {
            "id": "fake",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "length",
                    "message": {"role": "assistant", "content": "M"},
                    "logprobs": {"content": [{**top[0], "top_logprobs": top}]},
                }
            ],
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    FakeJudge.requests = []
    httpd = HTTPServer(("127.0.0.1", 0), FakeJudge)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/v1"
    httpd.shutdown()


RECORDS = [
    {"instruction": f"Question {i}?", "output_1": f"reference {i}", "output_2": f"model {i}"}
    for i in range(8)
]


def test_openai_judge_follows_the_weighted_gpt4_turbo_protocol(server, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", KEY)
    prefs = judges.openai_judge(
        RECORDS, model="gpt-4-1106-preview", base_url=server, api_key_env="MY_JUDGE_KEY", seed=3
    )
    swapped = judges.swapped_orders(len(RECORDS), 3)
    assert 0 < sum(swapped) < len(RECORDS)  # both orders occur
    # "M" = the second output shown wins with 0.9: the model's when not swapped
    assert prefs == pytest.approx([1.1 if s else 1.9 for s in swapped], abs=1e-6)
    sent = FakeJudge.requests
    assert len(sent) == len(RECORDS) and all(r["auth"] == f"Bearer {KEY}" for r in sent)
    body = sent[0]["body"]
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 5
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    user = body["messages"][1]["content"]
    assert '"instruction": """Question 0?"""' in user and "m or M" in user
    shown_first, shown_second = ("model 0", "reference 0")[:: -1 if not swapped[0] else 1]
    assert user.index(shown_first) < user.index(shown_second)


def test_the_key_never_reaches_annotations(server, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", KEY)
    prefs = judges.openai_judge(RECORDS[:2], model="x", base_url=server, api_key_env="MY_JUDGE_KEY")
    assert KEY not in json.dumps(judges.annotate(RECORDS[:2], prefs, "openai"))


def test_unreachable_or_unconfigured_judge_is_reported(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(judges.JudgeUnavailable, match="NO_SUCH_KEY_VAR is not set"):
        judges.openai_judge(RECORDS, model="x", api_key_env="NO_SUCH_KEY_VAR")
    monkeypatch.setenv("MY_JUDGE_KEY", KEY)
    with pytest.raises(judges.JudgeUnavailable, match="APIConnectionError") as err:
        judges.openai_judge(
            RECORDS, model="x", base_url="http://127.0.0.1:9/v1", api_key_env="MY_JUDGE_KEY"
        )
    assert KEY not in str(err.value)


def test_prompt_is_alpacaevals_template():
    turns = judges.judge_messages("Say {hi}", "first {output_2}", "second")
    assert turns[0]["role"] == "system" and "leaderboard" in turns[0]["content"]
    user = turns[1]["content"]
    assert '"""Say {hi}"""' in user and '"model_identifier": "M"' in user
    assert '"""first {output_2}"""' in user and user.index("first") < user.index("second")

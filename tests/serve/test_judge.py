"""`llmscratch eval judge` against `llmscratch serve`: a project model as the judge endpoint, end to end."""

import json

from clitools import run

from llmscratch.eval.judge import judge_prompt, parse_score

RECORDS = [{"instruction": "Name a colour.", "input": "", "output": "Blue.", "model_response": "Red."},
           {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "model_response": "6"}]


def test_eval_judge_scores_through_the_served_model(live_server, tmp_path, capsys):
    openai = __import__("pytest").importorskip("openai", reason="the openai client is not installed")
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps(RECORDS))
    code, out, err = run(["eval", "judge", str(responses), "--url", live_server.url, "--model", "tiny-gpt",
                          "--retries", "0", "--no-progress"], capsys)
    assert code == 0, err
    scores = json.loads((tmp_path / "responses.scores.json").read_text())
    assert scores["judge"]["endpoint"] == live_server.url + "/v1/chat/completions"
    assert len(scores["records"]) == 2 and scores["scored"] + scores["unscored"] == 2
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key="none")
    for record in scores["records"]:
        # The judge asked the server what the client asks here (greedy): the reply recorded is the server's answer.
        reply = client.chat.completions.create(
            model="tiny-gpt", temperature=0, seed=123,
            messages=[{"role": "user", "content": judge_prompt(record)}]).choices[0].message.content
        assert record["judge_reply"] == reply and record["score"] == parse_score(reply)
    assert "per-record scores in" in out


def test_eval_judge_names_a_model_the_server_does_not_serve(live_server, tmp_path, capsys):
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps(RECORDS[:1]))
    code, _, err = run(["eval", "judge", str(responses), "--url", live_server.url, "--model", "llama3",
                        "--retries", "0", "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1 and "HTTP 404" in err and "'llama3'" in err

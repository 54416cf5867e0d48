"""`llmscratch chat`: lines from stdin, answers equal to `generate` on the rendered conversation, the commands,
Ctrl-C during an answer, and the oldest turns dropped when the conversation outgrows the context."""

import importlib
import io

import pytest
from clitools import assert_user_error, run

ASK = ["--temperature", 0, "--max-new-tokens", 5, "--device", "cpu", "--dtype", "fp32"]


@pytest.fixture
def ckpt(tmp_path, prepared):
    """A random gpt-micro (context 64) with the 300-token BPE of `prepared`; weights drawn wide (std 0.3) so that
    answers depend on the prompt."""
    import torch

    from llmscratch import GPT, ModelConfig
    from llmscratch.checkpoint import save_model
    from llmscratch.tokenizer import load_tokenizer

    tok = load_tokenizer(prepared.parent / "tok")
    torch.manual_seed(0)
    return save_model(tmp_path / "ckpt", GPT(ModelConfig.from_preset("gpt-micro", vocab_size=tok.vocab_size,
                                                                     init_std=0.3)), tok)


@pytest.fixture
def prompts(monkeypatch):
    """The prompt texts the chat generates from, in order (`generate.stream` still runs)."""
    generate = _generate_module()
    seen, real = [], generate.stream

    def spy(model, tokenizer, prompt, **options):
        seen.append(prompt)
        return real(model, tokenizer, prompt, **options)

    monkeypatch.setattr(generate, "stream", spy)
    return seen


def _generate_module():
    # (`llmscratch.generate` as an attribute of the package is the function of that name, not the module)
    return importlib.import_module("llmscratch.generate")


def _chat(ckpt, lines, monkeypatch, capsys, *options):
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    return run(["chat", ckpt, *ASK, *options], capsys)


def _greedy(ckpt, texts, stop):
    """What `llmscratch generate` would print for each prompt text, as the chat loads the model. (`texts`: a copy
    of what `prompts` recorded, which this generation extends.)"""
    from llmscratch.cli.inference import load_for_inference
    from llmscratch.generate import generate

    model, tok = load_for_inference(str(ckpt), "cpu", "fp32")
    return [generate(model, tok, t, max_new_tokens=5, temperature=0, stop=stop).lstrip() for t in texts]


def test_answers_equal_generate_and_commands_change_the_conversation(ckpt, prompts, monkeypatch, capsys):
    lines = "hello\nhow are you\n/reset\nhi\n/system Be brief.\nhi\n/bogus\n/quit\nnever sent\n"
    code, out, err = _chat(ckpt, lines, monkeypatch, capsys)
    assert code == 0, err
    asked = list(prompts)
    answers = _greedy(ckpt, asked, ["\nUser:"])
    assert out == "".join(a + "\n" for a in answers)  # stdout: the answers alone, no prompt noise
    assert asked == [
        "User: hello\nAssistant:",
        f"User: hello\nAssistant: {answers[0]}\nUser: how are you\nAssistant:",
        "User: hi\nAssistant:",  # /reset forgot the first two turns
        "Be brief.\n\nUser: hi\nAssistant:",  # /system set a system message and started over
    ]
    assert "plain User:/Assistant: format" in err.splitlines()[0]
    assert "unknown command /bogus" in err


def test_each_turn_reads_only_what_it_adds_to_the_conversation(ckpt, prompts, monkeypatch, capsys):
    """The chat keeps the KV cache between turns (`KeptPrefix`): a turn starts after the tokens it shares with the
    previous turn's prompt and answer, and still answers as decoding its whole prompt afresh does."""
    from llmscratch.generate import common_prefix

    generate = _generate_module()
    starts, real = [], generate.generate_ids

    def spy(model, ids, *args, kept=None, **options):
        if kept is not None:  # (the chat's generations, not `_greedy`'s)
            starts.append((ids.size(1), kept.reusable(model, ids[0].tolist())))
        return real(model, ids, *args, kept=kept, **options)

    monkeypatch.setattr(generate, "generate_ids", spy)
    code, out, err = _chat(ckpt, "hello\nhow are you\n/reset\nhi\n", monkeypatch, capsys)
    assert code == 0, err
    asked = list(prompts)
    assert out == "".join(a + "\n" for a in _greedy(ckpt, asked, ["\nUser:"]))
    tok = _tokenizer(ckpt)
    lengths = [len(tok.encode(p)) for p in asked]
    assert [n for n, _ in starts] == lengths
    assert starts[0][1] == 0
    assert lengths[0] - 1 <= starts[1][1] < lengths[1]  # all of the first prompt (its last token again at most)
    # After /reset the new conversation shares only its first characters ("User: h") with the last one.
    assert starts[2][1] == common_prefix(tok.encode(asked[1]), tok.encode(asked[2])) < 8


def _tokenizer(ckpt):
    from llmscratch.tokenizer import load_tokenizer

    return load_tokenizer(ckpt)


def test_end_of_input_ends_and_a_saved_style_and_system_option_are_used(ckpt, prompts, monkeypatch, capsys):
    from llmscratch.prompts import get_style, save_style

    save_style(ckpt, "alpaca")
    code, out, err = _chat(ckpt, "//etc holds what?\n\n", monkeypatch, capsys, "--system", "Answer briefly.")
    assert code == 0, err
    style = get_style("alpaca")
    # `//` sends a message that starts with `/`; the empty line sends nothing
    asked = list(prompts)
    assert asked == [style.prompt({"system": "Answer briefly.", "instruction": "/etc holds what?", "input": ""})]
    assert out == _greedy(ckpt, asked, list(style.stop))[0] + "\n"
    assert "prompt style alpaca" in err


def test_ctrl_c_stops_the_answer_and_keeps_what_was_printed(ckpt, prompts, monkeypatch, capsys):
    generate = _generate_module()
    spy = generate.stream

    def interrupted_once(model, tokenizer, prompt, **options):
        if prompts:
            return spy(model, tokenizer, prompt, **options)
        prompts.append(prompt)
        return _pieces_then_interrupt()

    monkeypatch.setattr(generate, "stream", interrupted_once)
    code, out, err = _chat(ckpt, "hello\nmore\n", monkeypatch, capsys)
    assert code == 0, err
    assert out.startswith("Hel\n") and "answer stopped" in err
    assert prompts[1] == "User: hello\nAssistant: Hel\nUser: more\nAssistant:"


def _pieces_then_interrupt():
    yield " Hel"
    raise KeyboardInterrupt


def test_the_oldest_turns_are_dropped_when_the_context_is_full(ckpt, prompts, monkeypatch, capsys):
    from llmscratch.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    words = ["first", "second", "third", "fourth", "fifth"]
    lines = "".join(f"{w}: a value.\n" for w in words)  # ~25 tokens a turn: two fit, three do not
    code, out, err = _chat(ckpt, lines, monkeypatch, capsys)
    assert code == 0, err
    budget = 64 - 5  # context length less room for the answer
    assert all(len(tok.encode(p)) <= budget for p in prompts), [len(tok.encode(p)) for p in prompts]
    assert "first:" in prompts[1] and "first:" not in prompts[-1] and "fifth:" in prompts[-1]
    assert err.count("dropping its oldest turns") == 1  # said once, not at every turn after


def test_trimming_leaves_room_so_the_next_turns_begin_as_the_last_one_did(prepared):
    """Over a long conversation of turns of varied lengths: every prompt fits the budget; a trim drops the oldest
    turns down to a quarter below it; and a turn that drops nothing begins exactly with the last prompt and its
    answer, which is what lets the kept KV cache serve it. Most turns after the first trim are such turns (one
    turn dropped at a time would make none)."""
    import random

    from llmscratch.cli.chatting import Conversation
    from llmscratch.prompts import PlainChat
    from llmscratch.tokenizer import load_tokenizer

    tok = load_tokenizer(prepared.parent / "tok")
    rng = random.Random(7)
    words = "the cat sat on a mat while it rained and then we went home to read".split()
    budget = 600  # turns of ~15-70 tokens: a quarter of it holds a few
    chat = Conversation(PlainChat(), tok, budget, system=None)
    last, extended, trims = None, 0, 0
    for _ in range(60):
        user = " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(3, 20)))
        before = len(chat.turns)
        text = chat.prompt(user).text
        n = len(tok.encode(text))
        assert n <= budget, n
        if len(chat.turns) < before:  # trimmed: down to three quarters of the budget
            trims += 1
            assert n <= int(budget * Conversation.TRIM_TO), n
        elif last is not None and before:
            assert text.startswith(last), (last, text)
            extended += 1
        chat.add(user, answer)
        last = text + " " + answer + "\n"
    assert trims >= 3, trims
    assert extended >= 2 * trims, (extended, trims)


def test_a_missing_checkpoint_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    code, _, err = _chat(tmp_path / "nope", "hi\n", monkeypatch, capsys)
    assert_user_error(code, err, "not found")

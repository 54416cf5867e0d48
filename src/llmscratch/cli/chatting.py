"""`llmscratch chat`: a conversation with a checkpoint in the terminal, or through a pipe.

Each line read is one user message; the answer streams to stdout, and everything else (the format in use,
command replies, notes) goes to stderr, so `printf 'hi\\nbye\\n' | llmscratch chat CKPT > answers.txt` keeps
only the answers. The conversation is rendered by `llmscratch.prompts.chat_format`: the checkpoint's prompt
style, else its tokenizer's chat template, else the plain User:/Assistant: format.
"""

from __future__ import annotations

import sys

from llmscratch.cli.base import MODEL_FOLDER_HELP, Optional, PositiveInt, Verb, inference_options, sampling_options

COMMANDS = "/reset, /system [TEXT], /help, /quit"

HELP = """\
commands:
  /reset          forget the conversation (the system message stays)
  /system TEXT    set the system message and start over; /system alone removes it
  /help           this text
  /quit, /exit    leave (so does end of input, Ctrl-D)
A line that starts with // sends the rest as a message beginning with /. Ctrl-C stops an answer (what was
printed stays in the conversation); Ctrl-C at the prompt leaves.
"""


def _chat_parser(p) -> None:
    from jsonargparse import ActionYesNo

    p.add_argument("checkpoint", help=MODEL_FOLDER_HELP)
    p.add_argument("--system", default=None, help="system message to start with (`/system TEXT` changes it)")
    p.add_argument("--max-new-tokens", type=Optional[PositiveInt], default=None,
                   help="longest answer in tokens (default: 256, at most the context length); when the "
                        "conversation and this much room no longer fit in the model's context (the room capped at "
                        "half of it), the oldest turns are dropped, a quarter of the room left for the conversation at "
                        "a time, so the kept KV cache serves the turns after")
    sampling_options(p, temperature=0.7, seed_help="seed for reproducible sampling (each answer)")
    p.add_argument("--thinking", action=ActionYesNo(no_prefix="no-"), default=None,
                   help="Qwen3 chat templates: think before answering, or not (--no-thinking); default: the "
                        "template's own. Other formats ignore it")
    inference_options(p, pack=False)


class Conversation:
    """The messages of one chat: an optional system message, then user/assistant turns. `prompt` renders them
    with `fmt`; when the prompt would pass `budget` tokens, the oldest turns are dropped until it fits in
    `TRIM_TO` of the budget.

    Why not just enough to fit: the model's kept KV cache serves a turn only the tokens it shares with the last
    turn's prompt and answer from position 0 on (`generate.KeptPrefix`; keys are computed at their positions).
    Dropping one turn whenever the prompt is full shifts the conversation's start at every turn from then on, and
    the whole prompt is read again each time; dropping a quarter of the budget at once leaves the next turns room
    to grow on an unchanged start."""

    TRIM_TO = 0.75

    def __init__(self, fmt, tokenizer, budget: int, system: str | None = None, thinking: bool | None = None):
        self.fmt, self.tokenizer, self.budget, self.thinking = fmt, tokenizer, budget, thinking
        self.system = system or None
        self.turns: list[dict] = []
        self.trimmed = False  # whether turns were ever dropped: said once, not at every turn after

    def messages(self, user: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns + [{"role": "user", "content": user}]

    def prompt(self, user: str):
        """The `ChatPrompt` for the answer to `user`, after the turns so far (the oldest dropped to fit)."""
        prompt = self.fmt.render(self.messages(user), self.thinking)
        if len(self.tokenizer.encode(prompt.text)) <= self.budget:
            return prompt
        if self.turns and not self.trimmed:
            self.trimmed = True
            sys.stderr.write(f"llmscratch: the conversation outgrew the model's context ({self.budget} tokens "
                             "for the prompt); dropping its oldest turns from now on, a quarter of that at a "
                             "time\n")
        while self.turns:
            del self.turns[:2]  # one user message and its answer
            prompt = self.fmt.render(self.messages(user), self.thinking)
            if len(self.tokenizer.encode(prompt.text)) <= int(self.budget * self.TRIM_TO):
                break
        return prompt

    def add(self, user: str, answer: str) -> None:
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]

    def reset(self) -> None:
        """Forget the turns; the system message stays."""
        self.turns = []

    def set_system(self, system: str | None) -> None:
        """A new system message (None or "": none), and a new conversation under it."""
        self.system, self.turns = system or None, []


def cmd_chat(a) -> None:
    from llmscratch.cli.inference import load_for_inference, saved_style
    from llmscratch.generate import KeptPrefix, check_new_tokens
    from llmscratch.prompts import chat_format

    model, tok = load_for_inference(a.checkpoint, a.device, a.dtype)
    a.max_new_tokens = check_new_tokens(a.max_new_tokens, model, default=256)
    fmt = chat_format(tok, saved_style(a.checkpoint))
    context = model.config.context_length
    budget = context - min(a.max_new_tokens, context // 2)  # leave the answer room, but never all of it
    chat = Conversation(fmt, tok, budget, a.system, a.thinking)
    kept = KeptPrefix()  # each turn's prompt repeats the conversation so far: its keys and values are kept
    sys.stderr.write(f"llmscratch: chatting in the {fmt.describe()}; type a message, or {COMMANDS}\n")
    while (line := _read_line()) is not None:
        if line.startswith("/") and not line.startswith("//"):
            if not _command(line, chat):
                return
            continue
        text = line[1:] if line.startswith("//") else line
        if not text.strip():
            continue
        answer = _answer(model, tok, chat.prompt(text), a, kept)
        chat.add(text, answer)


def _read_line() -> str | None:
    """The next line typed, without its newline; None at end of input. Only a terminal gets a `you> ` prompt: from
    a pipe, stdout holds the answers alone."""
    if sys.stdin.isatty():
        try:
            return input("you> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def _command(line: str, chat: Conversation) -> bool:
    """Run a /command; False when it ends the chat."""
    name, _, rest = line.partition(" ")
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        chat.reset()
        sys.stderr.write("llmscratch: conversation cleared\n")
    elif name == "/system":
        chat.set_system(rest.strip())
        sys.stderr.write("llmscratch: " + ("system message set" if chat.system else "no system message") +
                         "; conversation cleared\n")
    elif name == "/help":
        sys.stderr.write(HELP)
    else:
        sys.stderr.write(f"llmscratch: unknown command {name}; commands: {COMMANDS} (// sends a leading /)\n")
    return True


def _answer(model, tok, prompt, a, kept) -> str:
    """Stream the answer to `prompt` (a `ChatPrompt`) to stdout and return it. Ctrl-C ends it early: what was
    printed is the answer. `kept`: the `KeptPrefix` of the conversation, so only what the prompt adds to the
    previous turn's tokens is read."""
    from llmscratch.generate import stream
    from llmscratch.prompts import strip_leading_space

    shown: list[str] = []
    pieces = stream(model, tok, prompt.text, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                    top_k=a.top_k or None, top_p=a.top_p, seed=a.seed, stop=list(prompt.stop),
                    compiled_ahead=True, kept=kept)
    answer = strip_leading_space(pieces)
    try:
        for piece in answer:
            sys.stdout.write(piece)
            sys.stdout.flush()
            shown.append(piece)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stderr.write("llmscratch: answer stopped\n")
        return "".join(shown)
    finally:
        answer.close()
        pieces.close()  # ends the generation; its KV cache is kept for the next turn
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(shown)


CHAT = Verb("Chat with a checkpoint: a message a line on stdin (terminal or pipe), answers streamed to stdout; in "
            "its prompt style, else its chat template, else plain User:/Assistant: lines. The KV cache is kept "
            "between turns, so a turn reads only what it adds to the conversation. Commands: /reset (forget the "
            "turns), /system [TEXT] (set or clear the system message, start over), /help, /quit or end of input. "
            "Ctrl-C stops an answer; at the prompt, leaves.", _chat_parser, cmd_chat)

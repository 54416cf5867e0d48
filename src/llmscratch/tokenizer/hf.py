"""Tokenizers shipped with Hugging Face model folders (Llama 3, Qwen3): `tokenizer.json` run by the
`tokenizers` library, plus what `tokenizer_config.json` adds — special tokens, the end-of-turn tokens and the
chat template that formats a conversation the way the model was trained on.

The chat template is a Jinja template over `messages` (a list of {"role", "content"}); it is rendered here in
a sandboxed Jinja environment with the settings Hugging Face documents for chat templates (blocks trimmed,
leading whitespace of block lines stripped, a `raise_exception` helper), so a prompt formatted here is the same
text `transformers`' `apply_chat_template` produces (tests/tokenizer/test_hf_tokenizer.py).
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

from llmscratch.errors import UserError, read_json
from llmscratch.fileio import atomic_write_text
from llmscratch.runs import TOKENIZER
from llmscratch.tokenizer.base import Tokenizer

# TOKENIZER: Hugging Face's tokenizer file has the same name as ours (`is_hf_tokenizer_json` tells them apart).
HF_TOKENIZER_FILES = (TOKENIZER, "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def is_hf_tokenizer_json(path: Path) -> bool:
    """True when `path` is a Hugging Face `tokenizer.json` (it has a "model" section), not ours."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
    except OSError:
        return False
    return '"model"' in head or ('"added_tokens"' in head and '"llmscratch' not in head)


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer folder, with its chat template and stop tokens."""

    def __init__(self, folder: str | Path):
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError:
            raise UserError(f"reading a Hugging Face {TOKENIZER} needs the `tokenizers` package: "
                            "pip install tokenizers") from None
        self.folder = Path(folder)
        try:
            self._tok = RustTokenizer.from_file(str(self.folder / TOKENIZER))
        except Exception as exc:  # the Rust parser reports any malformed file this way
            raise UserError(f"{self.folder / TOKENIZER}: cannot read it ({exc})") from None
        self.config = self._read_json("tokenizer_config.json")
        template_file = self.folder / "chat_template.jinja"
        self.chat_template = (template_file.read_text(encoding="utf-8") if template_file.is_file()
                              else self.config.get("chat_template"))
        self._added: dict[str, int] = {}  # special tokens added since the folder was read (add_special_tokens)
        self._read_vocab()

    def _read_vocab(self) -> None:
        self.special_tokens = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _read_json(self, name: str) -> dict:
        path = self.folder / name
        if not path.is_file():
            return {}
        data = read_json(path)
        return data if isinstance(data, dict) else {}

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(_token_text(self.config.get("eos_token")))

    @property
    def bos_token(self) -> str | None:
        return _token_text(self.config.get("bos_token"))

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a reply: the eos token and, from generation_config.json, every `eos_token_id` (Llama 3
        instruct models stop on <|eot_id|> and <|eom_id|> as well as <|end_of_text|>)."""
        ids = [] if self.eos_id is None else [self.eos_id]
        extra = self._read_json("generation_config.json").get("eos_token_id")
        for i in extra if isinstance(extra, list) else ([extra] if isinstance(extra, int) else []):
            if i not in ids:
                ids.append(i)
        return ids

    def encode(self, text: str, allowed_special: str | set[str] = "all") -> list[int]:
        # Special-token strings in the text are always recognised by this library; no BOS is prepended (a chat
        # template writes the BOS itself).
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        # The library's post-processor (tokenizer.json) adds what the model expects around an input: Gemma's and
        # Llama 3's BOS, nothing for Qwen3 — as transformers' tokenizer(text) does.
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside this tokenizer's {self._vocab_size} ids")
        return self._tok.decode(ids, skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        """The prompt text for `messages`, as the model's chat template formats it. `variables`: more template
        variables, as `transformers` passes its extra keyword arguments (Qwen3's `enable_thinking=False`)."""
        if not self.chat_template:
            raise UserError(f"{self.folder}: this tokenizer has no chat template (tokenizer_config.json)")
        tokens = {"bos_token": self.bos_token or "", "eos_token": _token_text(self.config.get("eos_token")) or ""}
        return render_chat_template(self.chat_template, messages, add_generation_prompt, **{**tokens, **variables})

    def _append_special_tokens(self, tokens: list[str]) -> None:
        from tokenizers import AddedToken

        # The library numbers added tokens itself, after the highest id it has: the ids `add_special_tokens`
        # promises. normalized=False matches a token's text exactly, as for the tokens a model ships with.
        self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        self._added.update({t: self._tok.token_to_id(t) for t in tokens})
        self._read_vocab()

    def save(self, directory: str | Path) -> None:
        """Copy the folder's tokenizer files into `directory`; after `add_special_tokens`, `tokenizer.json` and
        the `added_tokens_decoder` of `tokenizer_config.json` are written anew with the added tokens."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        rewritten = self._rewritten_files()
        for name in HF_TOKENIZER_FILES:
            if name in rewritten:
                atomic_write_text(directory / name, rewritten[name])
            elif (self.folder / name).is_file() and (self.folder / name).resolve() != (directory / name).resolve():
                shutil.copyfile(self.folder / name, directory / name)

    def _rewritten_files(self) -> dict[str, str]:
        """File name → new text, for the files that the added special tokens change (none before any is added)."""
        if not self._added:
            return {}
        files = {TOKENIZER: self._tok.to_str(pretty=True)}
        decoder = self.config.get("added_tokens_decoder")
        if isinstance(decoder, dict):  # transformers reads each added token's flags from here
            entry = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
            config = dict(self.config, added_tokens_decoder={
                **decoder, **{str(i): dict(entry, content=t) for t, i in self._added.items()}})
            files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        return files


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         **variables) -> str:
    """Render a chat template in a sandbox: no file or attribute access beyond plain data."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                   ensure_ascii=ensure_ascii)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **variables)
    except TemplateError as exc:
        raise UserError(f"chat template: {exc}") from None

"""Supervised records (`data.format=prompt_completion | chat`): .jsonl lines -> token ids and per-token
loss weights, computed once when the data is prepared.

- `prompt_completion`: BOS + prompt (weight 0) + completion + EOS (weight 1). Prompt and completion are
  tokenized separately, as MaxText's SFT does, so the boundary is a token boundary and what the model is
  trained to continue is exactly what generation is later given (the prompt's own tokens).
- `chat`: `messages` ([{role, content}, ...]) rendered through a Jinja chat template whose
  `{% generation %}...{% endgeneration %}` blocks mark the assistant spans (transformers' convention for
  `return_assistant_tokens_mask`): each span (its end-of-turn EOS included) gets weight 1, every system,
  user and template token 0. The template comes from `data.chat_template` (a file or the text itself),
  else the tokenizer's `tokenizer_config.json`, else llmx's default below.

A weight is the weight of the token as a *target*: the pipeline shifts it with the tokens, so the loss
counts the prediction of every completion token, the first one (predicted from the last prompt token)
included. `data.train_on_prompt=true` weights every token 1. Bad input is a DataError naming the file
and line: a line that is not JSON, a missing or mistyped field, a conversation without an assistant
turn, a rendered conversation whose assistant span is empty, a template without a generation marker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmx.data.sources import is_validation, resolve_files
from llmx.errors import DataError

log = logging.getLogger(__name__)

# llmx's template for tokenizers without one: role tags on their own lines, each assistant turn ended by
# EOS inside its generation block (so the model learns to stop).
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
# Private-use characters bracket each rendered generation block; the rendered text is split on them.
_OPEN, _CLOSE = "\ue000", "\ue001"


@dataclasses.dataclass(frozen=True)
class Record:
    key: str  # "path/to/file.jsonl:LINE" (1-based), for messages
    value: dict  # the parsed line
    line: str  # the raw line: its hash decides the split


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: the body, bracketed by sentinels."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark", []), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
        return _OPEN + caller() + _CLOSE


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def read_records(source: str, *, fields: dict[str, type], max_documents: int = 0) -> list[Record]:
    """Every non-empty line of the .jsonl files of `source` (a file, directory or glob), checked to be a
    JSON object with `fields` ({name: type}); anything else is a DataError naming the file and line."""
    path = Path(source).expanduser()
    files = [path] if path.is_file() else resolve_files(source, max_documents=max_documents)
    records = []
    for file in files:
        if file.suffix != ".jsonl":
            raise DataError(f"{file}: supervised data (data.format) is read from .jsonl files, one record per line")
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            key = f"{file}:{number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{key}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(value, dict):
                raise DataError(f"{key}: a record must be a JSON object, not {type(value).__name__}")
            for name, kind in fields.items():
                if name not in value:
                    raise DataError(f"{key}: the record has no field {name!r}; its fields: {', '.join(value) or 'none'}")
                if not isinstance(value[name], kind):
                    raise DataError(f"{key}: field {name!r} must be a {kind.__name__}, not {type(value[name]).__name__}")
            records.append(Record(key, value, line))
    if not records:
        raise DataError(f"data.source={source!r} holds no records")
    return records


def split_records(records: list[Record], *, validation_percent: float, folds: int, fold: int) -> dict[str, list[Record]]:
    """{'train': ..., 'validation': ...} by content hash: fold `fold` of `folds` (k-fold cross-validation)
    or `validation_percent` percent of the records."""
    def held_out(r: Record) -> bool:
        if folds:
            return int.from_bytes(hashlib.sha1(r.line.encode("utf-8")).digest()[:8], "little") % folds == fold
        return is_validation(r.line, validation_percent)

    splits = {"train": [r for r in records if not held_out(r)], "validation": [r for r in records if held_out(r)]}
    if not splits["train"]:
        raise DataError(f"every one of the {len(records)} records fell in the held-out split; lower data.validation_percent")
    return {k: v for k, v in splits.items() if v}


def load_template(data_cfg) -> tuple[str, str]:
    """(template text, where it came from): data.chat_template (a file or the text), else the
    tokenizer's tokenizer_config.json, else llmx's default."""
    spec = data_cfg.chat_template
    if spec:
        path = Path(spec).expanduser()
        if "{" not in spec and path.is_file():
            return path.read_text(encoding="utf-8"), f"data.chat_template file {path}"
        if "{" not in spec:
            raise DataError(f"data.chat_template={spec!r} is neither a file nor a Jinja template")
        return spec, "data.chat_template"
    loaded = data_cfg.tokenizer not in ("byte", "bpe")  # a path to a tokenizer.json
    config_file = Path(data_cfg.tokenizer).expanduser().with_name("tokenizer_config.json") if loaded else None
    if config_file is not None and config_file.is_file():
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # [{name, template}, ...]: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template:
            return template, f"the chat_template of {config_file}"
    return DEFAULT_CHAT_TEMPLATE, "llmx's default chat template"


class ChatTemplate:
    """A compiled chat template that renders a conversation as [(text, is_assistant), ...] pieces."""

    def __init__(self, text: str, *, origin: str, bos_token: str, eos_token: str):
        if not _GENERATION_TAG.search(text):
            raise DataError(
                f"{origin} has no {{% generation %}} marker: wrap each assistant message in "
                "{% generation %}...{% endgeneration %} so its tokens can be told from the prompt's"
            )
        # transformers renders chat templates in the same sandbox with the same whitespace settings.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation])
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(text)
        except jinja2.exceptions.TemplateError as e:
            raise DataError(f"{origin} is not a valid Jinja template: {e}") from None
        self.origin, self.bos_token, self.eos_token = origin, bos_token, eos_token

    def pieces(self, messages: list[dict], *, key: str, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        try:
            text = self.template.render(messages=messages, bos_token=self.bos_token, eos_token=self.eos_token,
                                        add_generation_prompt=add_generation_prompt)
        except (jinja2.exceptions.TemplateError, TypeError, KeyError) as e:
            raise DataError(f"{key}: {self.origin} cannot render this conversation: {e}") from None
        out, inside = [], False
        for part in re.split(f"([{_OPEN}{_CLOSE}])", text):
            if part in (_OPEN, _CLOSE):
                inside = part == _OPEN
            elif part:
                out.append((part, inside))
        return out


class Formatter:
    """Turns a Record into {'tokens': (N,) int32, 'weights': (N,) int32} for `data.format` (`text` and
    `pieces` need no tokenizer: a BPE tokenizer is trained on the rendered records)."""

    def __init__(self, data_cfg, tokenizer=None):
        self.cfg, self.tokenizer = data_cfg, tokenizer
        self.template = None
        if data_cfg.format == "chat":
            text, origin = load_template(data_cfg)
            self.template = ChatTemplate(text, origin=origin, bos_token=data_cfg.bos_token, eos_token=data_cfg.eos_token)

    def fields(self) -> dict[str, type]:
        c = self.cfg
        if c.format == "prompt_completion":
            return {c.prompt_field: str, c.completion_field: str}
        return {c.messages_field: list}

    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` with the configured BOS/EOS strings as their special ids (byte-level tokenizers
        have no strings for them)."""
        ids: list[int] = []
        specials = {self.cfg.bos_token: self.tokenizer.bos_id, self.cfg.eos_token: self.tokenizer.eos_id}
        pattern = "(" + "|".join(re.escape(s) for s in specials) + ")"
        for part in re.split(pattern, text):
            if part in specials:
                ids.append(specials[part])
            elif part:
                ids.extend(int(i) for i in self.tokenizer.encode(part, add_bos=False, add_eos=False))
        return ids

    def pieces(self, record: Record) -> list[tuple[str, bool]]:
        """The record as [(text, counts toward the loss), ...], BOS and EOS as their strings."""
        c, v = self.cfg, record.value
        if c.format == "prompt_completion":
            if not v[c.completion_field]:
                raise DataError(f"{record.key}: field {c.completion_field!r} is empty: nothing to train on")
            return [(c.bos_token + v[c.prompt_field], False), (v[c.completion_field] + c.eos_token, True)]
        messages = v[c.messages_field]
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{record.key}: every message needs a string 'role' and 'content'; got {m!r:.80}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{record.key}: the conversation has no assistant turn: nothing to train on")
        pieces = self.template.pieces(messages, key=record.key)
        if not any(text for text, inside in pieces if inside):
            raise DataError(f"{record.key}: {self.template.origin} renders an empty assistant span for this conversation")
        if not pieces[0][0].startswith(c.bos_token):
            pieces[0] = (c.bos_token + pieces[0][0], pieces[0][1])
        return pieces

    def text(self, record: Record) -> str:
        """The rendered record (what a BPE tokenizer is trained on)."""
        return "".join(text for text, _ in self.pieces(record))

    def encode(self, record: Record) -> dict[str, np.ndarray]:
        tokens, weights = [], []
        for text, counts in self.pieces(record):
            ids = self.encode_text(text)
            tokens += ids
            weights += [int(counts or self.cfg.train_on_prompt)] * len(ids)
        return {"tokens": np.asarray(tokens, np.int32), "weights": np.asarray(weights, np.int32)}

    def prompt_ids(self, text: str) -> list[int]:
        """A prompt as training saw it: BOS + prompt (prompt_completion) or a one-turn user conversation
        with the generation prompt (chat)."""
        if self.template is None:
            return self.encode_text(self.cfg.bos_token + text)
        pieces = self.template.pieces([{"role": "user", "content": text}], key="prompt", add_generation_prompt=True)
        rendered = "".join(t for t, _ in pieces)
        return self.encode_text(rendered if rendered.startswith(self.cfg.bos_token) else self.cfg.bos_token + rendered)


def encode_all(formatter: Formatter, records: list[Record], *, max_tokens: int) -> tuple[dict[str, np.ndarray], ...]:
    """Every record encoded (so every bad record is found now, not mid-training); records longer than a
    packed row (`max_tokens`) are cut to it, and the count is logged. A tuple: a random-access source
    (`llmx.data.pipeline.document_stream` reads a list as a weighted mixture of sources)."""
    out, cut = [], 0
    for record in records:
        encoded = formatter.encode(record)
        if len(encoded["tokens"]) > max_tokens:
            cut += 1
            encoded = {k: v[:max_tokens] for k, v in encoded.items()}
        out.append(encoded)
    if cut:
        log.warning("%d of %d records are longer than model.seq_len + 1 = %d tokens and were cut", cut, len(records), max_tokens)
    return tuple(out)

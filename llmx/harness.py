"""Task evaluation through lm-evaluation-harness (the `eval` extra): an `lm_eval` model adapter backed by
llmx's own sharded forward and KV-cache decoding, the project's task directory, and the runner behind
`python -m llmx.evaluate --tasks` and the trainer's `train.eval_tasks` hook.

The adapter (`LlmxLM`, registered as `llmx`) answers the harness's three request types in fixed-shape
batches (rows padded to a power-of-two length bucket and to the batch size, so a handful of programs
compile): `loglikelihood` (HFLM's rule: the continuation's tokens are those the context+continuation
encoding adds after the context's, so a continuation that merges with the context's last token is
scored as the tokenizer would see it), `loglikelihood_rolling` (lm_eval's disjoint rolling windows of
`model.seq_len`, prefixed with BOS), and `generate_until` (`llmx.generate`: left-padded prefill and
KV-cache decode on the mesh, greedy unless the task samples; stops at EOS and cuts at `until`).

Tasks are plain harness YAMLs. The project's own live in `configs/tasks/` (always searched, before any
`--include-path`); a task whose `dataset_kwargs.data_files` are relative paths reads them relative to
its YAML's directory, so local JSONL tasks work from any directory and nothing is downloaded.
lm_eval's ~15,000 built-in tasks are indexed (tens of seconds) only when a name is not found here.
Importing this module needs lm_eval; the trainer imports it only when `train.eval_tasks` is set.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSONL tasks: never reach for the Hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
import lm_eval.api.task  # noqa: E402
import lm_eval.tasks  # noqa: E402
from lm_eval import evaluator  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.tasks._index import Kind  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from llmx import batch as batch_lib  # noqa: E402
from llmx import mesh as mesh_lib  # noqa: E402
from llmx.data.supervised import Formatter  # noqa: E402
from llmx.errors import ConfigError  # noqa: E402
from llmx.generate import generate  # noqa: E402

log = logging.getLogger(__name__)

# lm_eval draws a progress bar over every task's documents while it builds requests, with no switch to
# turn it off; on a training run's stderr it is noise between the step lines.
lm_eval.api.task.tqdm = functools.partial(lm_eval.api.task.tqdm, disable=True)

TASKS_DIR = Path(__file__).resolve().parents[1] / "configs" / "tasks"
MIN_BUCKET = 16


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_logprobs(params, tokens, targets, segment_ids, positions, *, graphdef):
    """(log p(target) (B, T), target is the argmax (B, T)) for rows of tokens (B, T)."""
    model = nnx.merge(graphdef, params)
    logits = model(tokens, segment_ids, positions)  # (B, T, V) fp32
    logp = jax.nn.log_softmax(logits, axis=-1)
    # The one-hot contraction of llmx.step.loss_sums: the same numbers as llmx.evaluate's loss.
    target_logp = jnp.einsum("btv,btv->bt", logp, jax.nn.one_hot(targets, logp.shape[-1], dtype=logp.dtype))
    return target_logp, jnp.argmax(logits, axis=-1) == targets


@register_model("llmx")
class LlmxLM(LM):
    """An lm_eval LM over llmx parameters on a mesh. `from_run` builds one from a run directory."""

    def __init__(self, *, params, graphdef, tokenizer, data_cfg, seq_len: int, mesh, batch_size: int = 16):
        super().__init__()
        self.params, self.graphdef, self.tokenizer, self.mesh = params, graphdef, tokenizer, mesh
        self.data_cfg, self.seq_len = data_cfg, seq_len
        dp = batch_lib.data_parallel_size(mesh)
        self.batch_size = -(-int(batch_size) // dp) * dp  # rows split evenly over the batch axes
        self.formatter = Formatter(data_cfg, tokenizer)

    @classmethod
    def from_run(cls, run, *, batch_size: int = 16) -> LlmxLM:
        """From `llmx.run.restore_run`'s RestoredRun."""
        return cls(params=run.params, graphdef=run.steps.graphdef, tokenizer=run.tokenizer, data_cfg=run.cfg.data,
                   seq_len=run.cfg.model.seq_len, mesh=run.steps.mesh, batch_size=batch_size)

    # ------------------------------------------------------------ encoding

    def _encode(self, text: str, *, bos: bool) -> list[int]:
        """Ids of `text` (the configured BOS/EOS strings become their ids, as in training)."""
        ids = self.formatter.encode_text(text)
        return [self.tokenizer.bos_id, *ids] if bos else ids

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) by HFLM's rule (lm_eval.models.huggingface._encode_pair)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:  # a context's trailing whitespace belongs to the continuation
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.tokenizer.bos_id], self._encode(continuation, bos=False)
        whole = self._encode(context + continuation, bos=True)
        n_context = len(self._encode(context, bos=True))
        return whole[:n_context], whole[n_context:]

    # ------------------------------------------------------------ scoring

    def _score(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(sum of log p, all greedy) over the last n tokens of each (tokens, n) row, in order."""
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            longest = max(len(rows[i][0]) - 1 for i in chunk)
            T = min(self.seq_len, max(MIN_BUCKET, 1 << (longest - 1).bit_length()))
            arrays = {k: np.zeros((self.batch_size, T), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
            scored = np.zeros((self.batch_size, T), bool)
            for r, i in enumerate(chunk):
                tokens, n = rows[i]
                tokens = tokens[-(T + 1):]  # left-truncated to the context window
                m = len(tokens) - 1
                arrays["tokens"][r, :m], arrays["targets"][r, :m] = tokens[:-1], tokens[1:]
                arrays["segment_ids"][r, :m], arrays["positions"][r, :m] = 1, np.arange(m)
                scored[r, m - min(n, m):m] = True
            sharding = batch_lib.sharding(self.mesh, 2)
            placed = {k: jax.device_put(v, sharding) for k, v in arrays.items()}
            with mesh_lib.activation_sharding(self.mesh):
                logp, greedy = _token_logprobs(self.params, placed["tokens"], placed["targets"],
                                               placed["segment_ids"], placed["positions"], graphdef=self.graphdef)
            logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
            for r, i in enumerate(chunk):
                out[i] = (float(logp[r][scored[r]].sum()), bool(greedy[r][scored[r]].all()))
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        rows = []
        for request in requests:
            context, continuation = self._pair(*request.args)
            rows.append((context + continuation, len(continuation)))
        results = self._score(rows)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        results = []
        for request in requests:
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self._encode(text, bos=False), prefix_token=self.tokenizer.bos_id,
                max_seq_len=self.seq_len, context_len=1)]
            total = sum(logp for logp, _ in self._score([(ctx + pred, len(pred)) for ctx, pred in windows]))
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            results.append(total)
        return results

    def generate_until(self, requests) -> list[str]:
        out = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            members = sorted(members, key=lambda i: len(requests[i].args[0]))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                room = max(1, self.seq_len - min(max_new, self.seq_len // 2))
                prompts = [self._encode(requests[i].args[0], bos=True)[-room:] for i in chunk]
                new = generate(self.params, self.graphdef, prompts, max_new_tokens=max_new, max_len=self.seq_len,
                               eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id, temperature=temperature,
                               top_k=int(kwargs.get("top_k", 0)), top_p=float(kwargs.get("top_p", 1.0)),
                               mesh=self.mesh)
                for i, ids in zip(chunk, new):
                    text = self.tokenizer.decode(ids)
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    # ------------------------------------------------------------ chat (data.format=chat runs)

    @property
    def tokenizer_name(self) -> str:
        return str(self.data_cfg.tokenizer)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.formatter.template.template if self.formatter.template is not None else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self.formatter.template is None:
            raise ConfigError("--apply-chat-template needs a run trained with data.format=chat")
        pieces = self.formatter.template.pieces(chat_history, key="chat", add_generation_prompt=add_generation_prompt)
        text = "".join(t for t, _ in pieces)
        return text.removeprefix(self.data_cfg.bos_token)  # _encode adds BOS


# ---------------------------------------------------------------- tasks


def _absolute_data_files(cfg: dict, yaml_dir: Path) -> dict:
    """A task config whose relative `dataset_kwargs.data_files` point at files beside its YAML."""
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")

    def fix(path):
        return str(yaml_dir / path) if isinstance(path, str) and (yaml_dir / path).is_file() else path

    if isinstance(files, dict):
        kwargs["data_files"] = {k: [fix(p) for p in v] if isinstance(v, list) else fix(v) for k, v in files.items()}
    elif files is not None:
        kwargs["data_files"] = [fix(p) for p in files] if isinstance(files, list) else fix(files)
    return {**cfg, "dataset_kwargs": kwargs} if files is not None else cfg


_BUILTIN_TASKS = Path(lm_eval.tasks.__file__).parent
_NAME_LINE = re.compile(r"^\s*(?:task|tag|group|task_alias)\s*:\s*['\"]?([\w.\-]+)", re.MULTILINE)


def _check_builtin(names: Sequence[str], *, local: list[str], paths: Sequence[Path]) -> None:
    """A ConfigError for a name that no built-in task YAML even mentions. Indexing lm_eval's ~14,000
    YAMLs takes minutes on a busy 2-core machine; reading them as text takes seconds, so a typo fails
    fast (a mentioned name still goes through the real index, which has the final word)."""
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in _BUILTIN_TASKS.rglob("*.yaml")]
    for name in names:
        if any(name in text for text in texts):
            continue
        known = local + [m for text in texts for m in _NAME_LINE.findall(text)]
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown task {name!r}{hint} (tasks: {', '.join(map(str, paths))} and lm_eval's own)")


class Tasks:
    """The task index over configs/tasks and `include` directories (lm_eval's own tasks on demand)."""

    def __init__(self, include: Sequence[str | Path] = ()):
        self.paths = [TASKS_DIR, *(Path(p) for p in include if p)]
        for p in self.paths[1:]:
            if not p.is_dir():
                raise ConfigError(f"--include-path {p}: no such directory of task YAMLs")
        self.manager = TaskManager(include_path=[str(p) for p in self.paths], include_defaults=False)

    def specs(self, names: Sequence[str]) -> list:
        """What lm_eval's TaskManager.load takes for each name: local tasks as configs with their data
        files resolved, tags expanded, anything else by name (an unknown name is a ConfigError)."""
        missing = [n for n in names if n not in self.manager.task_index]
        if missing:
            _check_builtin(missing, local=list(self.manager.task_index), paths=self.paths)
            log.info("indexing lm-evaluation-harness's built-in tasks for %s", ", ".join(missing))
            self.manager = TaskManager(include_path=[str(p) for p in self.paths], include_defaults=True)
        index = self.manager.task_index
        specs = []
        for name in names:
            entry = index.get(name)
            if entry is None:
                close = difflib.get_close_matches(name, list(index), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; tasks are searched in {', '.join(map(str, self.paths))} and lm_eval's own"
                raise ConfigError(f"unknown task {name!r}{hint}")
            members = [e for e in index.values() if name in e.tags] if entry.kind == Kind.TAG else [entry]
            for e in members:
                if e.kind == Kind.TASK and e.yaml_path is not None:
                    specs.append(_absolute_data_files(load_yaml(e.yaml_path), Path(e.yaml_path).parent))
                else:
                    specs.append(e.name)
        return specs


def run_tasks(lm: LlmxLM, tasks: Tasks, names: Sequence[str], *, limit: int = 0, bootstrap_iters: int = 0) -> dict:
    """{task: {metric: value}} of lm_eval's simple_evaluate on `names` (stderr only with bootstrap_iters)."""
    results = evaluator.simple_evaluate(model=lm, tasks=tasks.specs(names), task_manager=tasks.manager,
                                        limit=limit or None, bootstrap_iters=bootstrap_iters, log_samples=False)
    return flatten(results)


def flatten(results: dict) -> dict[str, dict[str, float]]:
    """lm_eval's results -> {task: {metric: value}}; 'metric,filter' keys become 'metric' for the
    `none` filter and 'metric/filter' otherwise; stderr as 'metric_stderr' when computed."""
    table = {}
    for task, metrics in results["results"].items():
        row = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
        table[task] = row
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    lines = [f"{'task':<24}{'metric':<28}{'value':>10}"]
    for task, metrics in table.items():
        for metric, value in metrics.items():
            lines.append(f"{task:<24}{metric:<28}{value:>10.4f}")
    return "\n".join(lines)

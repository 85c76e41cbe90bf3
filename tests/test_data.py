import numpy as np
import pytest

import json
import subprocess

import tensorflow_datasets as tfds

from conftest import PYTHON, REPO
from helpers import small_config
from llmx.data import ByteTokenizer, batches, prepare_data
from llmx.data.pipeline import process_rows, state_from_json, state_to_json
from llmx.data.sources import Cleaning, clean_text, is_validation, parse_mixture, text_corpus
from llmx.data.tokenizer import train_bpe
from llmx.errors import DataError


def prepare(source, *, cache_dir, validation_percent, max_documents=0, **cleaning):
    return text_corpus(source, cache_dir=cache_dir, max_documents=max_documents,
                       cleaning=Cleaning(validation_percent=validation_percent, **cleaning))


@pytest.fixture(scope="module")
def sources(data_dir):
    return prepare("stdlib", cache_dir=str(data_dir), validation_percent=20, max_documents=80)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo' + x  # ünïcode\n"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.pad_id not in ids


def test_cleaning_drops_binary_and_empty_and_normalises_newlines():
    assert clean_text(b"\x00\x01\x02") is None
    assert clean_text(b"\xff\xfe\xfa") is None
    assert clean_text(b"  \n\t ") is None
    assert clean_text(b"a\r\nb\rc\n") == "a\nb\nc\n"


def test_validation_split_is_disjoint_stable_and_hash_based(sources, data_dir):
    train = {r["path"] for r in sources["train"]}
    val = {r["path"] for r in sources["validation"]}
    assert train and val and not train & val
    assert all(is_validation(r["text"].decode(), 20) for r in sources["validation"])
    again = prepare("stdlib", cache_dir=str(data_dir), validation_percent=20, max_documents=80)
    assert {r["path"] for r in again["validation"]} == val


def test_packed_batches_never_cross_documents(sources):
    tok = ByteTokenizer()
    batch = next(iter(batches(sources["train"], tok, seq_len=64, global_rows=4, seed=0)))
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    assert all(v.shape == (4, 64) for v in batch.values())
    seg, pos, mask = batch["segment_ids"], batch["positions"], batch["loss_mask"]
    for row in range(4):
        for t in range(64):
            if t and seg[row, t] != seg[row, t - 1]:
                assert pos[row, t] == 0  # positions restart with every document
        # A target counts only when it is the next token of the same document.
        np.testing.assert_array_equal(batch["targets"][row, :-1], batch["inputs"][row, 1:])
    boundary = np.zeros_like(mask)
    boundary[:, :-1] = seg[:, 1:] != seg[:, :-1]
    assert not (mask & boundary).any()
    assert (~mask[seg == 0]).all()
    # Every document starts with BOS at position 0 (a document split across rows restarts at 0 too).
    assert (pos[batch["inputs"] == tok.bos_id] == 0).all()


def test_shuffle_is_deterministic_by_seed(sources):
    tok = ByteTokenizer()
    a = next(iter(batches(sources["train"], tok, seq_len=32, global_rows=2, seed=1)))
    b = next(iter(batches(sources["train"], tok, seq_len=32, global_rows=2, seed=1)))
    c = next(iter(batches(sources["train"], tok, seq_len=32, global_rows=2, seed=2)))
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(a["inputs"], c["inputs"])


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_read_disjoint_complete_shards_and_build_the_same_global_batch(sources, processes):
    tok = ByteTokenizer()
    leading, rows = 2, 8
    make = lambda **kw: iter(batches(sources["train"], tok, seq_len=32, global_rows=leading * rows, seed=3,
                                     prefetch=0, **kw))
    whole = [next(make()) for _ in range(1)][0]  # one process builds every row, in stream order
    owned = [process_rows(process_index=p, process_count=processes, leading=leading, rows=rows)
             for p in range(processes)]
    flat = sorted(r for ids in owned for r in ids)
    assert flat == list(range(leading * rows))  # every row stream belongs to exactly one process
    for ids in owned:
        part = next(make(rows=ids))
        for key in whole:
            np.testing.assert_array_equal(part[key], whole[key][ids])
    # Row stream r reads documents r, r + G, r + 2G, ...: the processes' documents are disjoint and
    # together cover the corpus.
    n_docs, g = len(sources["train"]), leading * rows
    docs = [{d for r in ids for d in range(r, n_docs, g)} for ids in owned]
    assert sum(map(len, docs)) == n_docs and set().union(*docs) == set(range(n_docs))


def test_resume_from_a_global_state_with_another_process_count(sources):
    tok = ByteTokenizer()
    make = lambda rows=None: iter(batches(sources["train"], tok, seq_len=32, global_rows=4, rows=rows, seed=0, prefetch=0))
    one = make()
    for _ in range(3):
        next(one)
    global_state = one.get_state()
    expected = next(one)
    for p in range(2):
        ids = process_rows(process_index=p, process_count=2, leading=1, rows=4)
        part = make(ids)
        part.set_state(global_state)
        got = next(part)
        np.testing.assert_array_equal(got["inputs"], expected["inputs"][ids])


@pytest.mark.parametrize("rows", [3, 64])  # 64 streams over ~68 documents: many empty remainders
def test_iterator_resumes_with_the_exact_next_batch(sources, rows):
    tok = ByteTokenizer()
    make = lambda: iter(batches(sources["train"], tok, seq_len=32, global_rows=rows, seed=0))
    uninterrupted = make()
    expected = [next(uninterrupted) for _ in range(7)]
    first = make()
    for _ in range(4):
        next(first)
    state = json.loads(json.dumps(state_to_json(first.get_state())))  # as a checkpoint stores it
    resumed = make()
    resumed.set_state(state_from_json(state))
    for k in range(4, 7):
        got = next(resumed)
        for key in expected[k]:
            np.testing.assert_array_equal(got[key], expected[k][key])


def test_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="holds no files"):
        prepare(str(tmp_path), cache_dir=str(tmp_path / "cache"), validation_percent=10)


def test_only_binary_files_is_a_clear_error(tmp_path):
    corpus = tmp_path / "bin"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_bytes(bytes(range(256)))  # binary content behind a text suffix
    (corpus / "blob.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match="holds usable text documents"):
        prepare(str(corpus), cache_dir=str(tmp_path / "cache"), validation_percent=10)
    only_bin = tmp_path / "onlybin"
    only_bin.mkdir()
    (only_bin / "a.bin").write_bytes(b"\x01\x02")
    with pytest.raises(DataError, match="none of type .txt, .py, .md, .jsonl"):
        prepare(str(only_bin), cache_dir=str(tmp_path / "cache"), validation_percent=10)


def _write_corpus(root):
    root.mkdir()
    (root / "a.md").write_text("# Title\r\nSome *markdown* text.\r\n")
    (root / "b.txt").write_text("plain text that is long enough to keep\n")
    (root / "dup.txt").write_text("plain text that is long enough to keep\n")
    (root / "short.txt").write_text("hi\n")
    lines = [json.dumps({"text": f"json document number {i} with some words"}) for i in range(5)]
    lines += ["not json", json.dumps({"other": "no text field"})]
    (root / "c.jsonl").write_text("\n".join(lines) + "\n")
    (root / "ignored.bin").write_bytes(b"\x00\x01")


def test_directory_of_text_and_jsonl_with_cleaning(tmp_path):
    _write_corpus(tmp_path / "corpus")
    splits = prepare(str(tmp_path / "corpus"), cache_dir=str(tmp_path / "cache"), validation_percent=0,
                     min_chars=10, dedup=True)
    texts = sorted(r["text"].decode() for r in splits["train"])
    assert "# Title\nSome *markdown* text.\n" in texts  # line endings normalised
    assert sum(t.startswith("json document number") for t in texts) == 5  # one document per jsonl line
    assert texts.count("plain text that is long enough to keep\n") == 1  # exact duplicate dropped
    assert not any(t == "hi\n" for t in texts)  # shorter than min_chars
    assert len(texts) == 7
    globbed = prepare(str(tmp_path / "corpus" / "*.jsonl"), cache_dir=str(tmp_path / "cache"), validation_percent=0)
    assert len(globbed["train"]) == 5


def test_bpe_train_encode_decode_round_trip(tmp_path, sources):
    texts = [r["text"].decode() for r in sources["train"]][:30]
    path = train_bpe(iter(texts), vocab_size=400, path=tmp_path / "tok.json")
    cfg = small_config(tmp_path, tmp_path, f"data.tokenizer={path}")
    from llmx.data.tokenizer import build_tokenizer

    tok = build_tokenizer(cfg.data, vocab_size=512)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and tok.vocab_size == 400
    sample = "def résumé(x):\n    return x ** 2  # 🙂\n"
    ids = tok.encode(sample)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert len(ids) < len(sample.encode())  # merges happened
    assert tok.decode(ids) == sample


def test_bpe_is_trained_once_and_saved_in_the_run(tmp_path, data_dir):
    cfg = small_config(tmp_path, data_dir, "data.tokenizer=bpe", "data.bpe_vocab_size=300", "model.vocab_size=384")
    run = tmp_path / "run"
    first = prepare_data(cfg, run_dir=run)
    assert (run / "tokenizer.json").is_file() and first.tokenizer.vocab_size == 300
    again = prepare_data(cfg, run_dir=run)
    text = "import os\nprint(os.getcwd())\n"
    np.testing.assert_array_equal(first.tokenizer.encode(text), again.tokenizer.encode(text))


def test_mixture_weights_are_respected(tmp_path, data_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    for root, letter in ((a, "a"), (b, "b")):
        root.mkdir()
        for i in range(20):
            (root / f"{i}.txt").write_text(letter * (50 + i))
    assert parse_mixture(f"{a}@3,{b}@1") == [(str(a), 0.75), (str(b), 0.25)]
    cfg = small_config(tmp_path, data_dir, f"data.source={a}@3,{b}@1", "data.validation_percent=0")
    data = prepare_data(cfg)
    docs = iter(batches(data.train, ByteTokenizer(), seq_len=4000, global_rows=1, seed=0, prefetch=0))
    row = next(docs)["inputs"][0]
    n_a, n_b = (row == ord("a") + 3).sum(), (row == ord("b") + 3).sum()
    assert 2.4 < n_a / n_b < 3.8


def test_named_tfds_dataset_with_mock_data(tmp_path):
    cfg = small_config(tmp_path, tmp_path, "data.source=tfds:lm1b", "data.eval_split=test")
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        data = prepare_data(cfg)
        assert len(data.train[0][0]) == 12 and len(data.eval_sets["validation"]) == 12
        batch = next(iter(batches(data.train, data.tokenizer, seq_len=16, global_rows=2, seed=0)))
    assert batch["inputs"].shape == (2, 16)


def test_prepare_cli_summarises(tmp_path, subprocess_env, data_dir):
    proc = subprocess.run(
        [PYTHON, "-m", "llmx.data", "prepare", "--config", "configs/tiny.yaml", "--json", f"data.cache_dir={data_dir}",
         "data.max_documents=80", "data.validation_percent=20"],
        cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["sets"]["train"]["documents"] > 0 and report["sets"]["validation"]["documents"] > 0
    train = report["sets"]["train"]
    assert train["tokens"] == train["bytes"] + 2 * train["documents"]  # byte tokenizer: BOS + bytes + EOS
    assert report["cleaning"]["stdlib"]["files"] == 80

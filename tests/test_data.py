import numpy as np
import pytest

from llmx.data import ByteTokenizer, batches, prepare
from llmx.data.pipeline import documents
from llmx.data.sources import clean_text, is_validation
from llmx.errors import DataError


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
    batch = next(iter(batches(sources["train"], tok, seq_len=64, batch_rows=4, seed=0)))
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
    a = next(iter(batches(sources["train"], tok, seq_len=32, batch_rows=2, seed=1)))
    b = next(iter(batches(sources["train"], tok, seq_len=32, batch_rows=2, seed=1)))
    c = next(iter(batches(sources["train"], tok, seq_len=32, batch_rows=2, seed=2)))
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(a["inputs"], c["inputs"])


@pytest.mark.parametrize("processes", [2, 4])
def test_process_shards_are_disjoint_and_complete(sources, processes):
    shards = [
        [r["path"] for r in documents(sources["train"], seed=3, process_index=p, process_count=processes)]
        for p in range(processes)
    ]
    flat = [path for shard in shards for path in shard]
    assert len(flat) == len(set(flat))  # disjoint
    assert set(flat) == {r["path"] for r in sources["train"]}  # complete
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_iterator_resumes_with_the_exact_next_batch(sources):
    tok = ByteTokenizer()
    make = lambda: iter(batches(sources["train"], tok, seq_len=32, batch_rows=3, seed=0))
    uninterrupted = make()
    expected = [next(uninterrupted) for _ in range(7)]
    first = make()
    for _ in range(4):
        next(first)
    state = first.get_state()
    resumed = make()
    resumed.set_state(state)
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
        (corpus / f"{i}.bin").write_bytes(bytes(range(256)))
    with pytest.raises(DataError, match="holds usable text documents"):
        prepare(str(corpus), cache_dir=str(tmp_path / "cache"), validation_percent=10)

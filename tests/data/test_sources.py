import json

import pytest

from gonogo.data.loader import PackedLoader
from gonogo.data.sources import make_source
from gonogo.data.tokenizer import ByteTokenizer
from gonogo.errors import UserError


def all_documents(source):
    return [source.document(index, 0) for index in range(len(source))]


def paragraphs(count):
    return [f"paragraph {index} says something different: {index * 37 % 101}" for index in range(count)]


def test_text_file_documents_are_paragraphs_split_by_hash(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs(300)) + "\n", encoding="utf-8")
    train = all_documents(make_source(path, "train", val_percent=10))
    val = all_documents(make_source(path, "val", val_percent=10))
    assert sorted(train + val) == sorted(paragraphs(300))
    assert not set(train) & set(val) and 10 <= len(val) <= 60
    inputs, _ = next(PackedLoader(make_source(path), seq_len=16, batch_size=2))
    assert inputs.shape == (2, 16)


def test_jsonl_text_field_and_bad_lines(tmp_path, caplog):
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"body": text}) for text in paragraphs(100)] + ["{oops", json.dumps({"title": "x"})]
    path.write_text("\n".join(lines) + "\n")
    train = all_documents(make_source(path, "train", text_field="body"))
    val = all_documents(make_source(path, "val", text_field="body"))
    assert sorted(train + val) == sorted(paragraphs(100))
    assert "corpus.jsonl:101: skipped: not JSON" in caplog.text
    assert "corpus.jsonl:102: skipped: no 'body' field" in caplog.text
    with pytest.raises(UserError, match="no line had a usable 'text' string"):
        make_source(path)


def test_json_array_file(tmp_path):
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps([{"text": text} for text in paragraphs(60)] + [{"other": 1}]))
    documents = all_documents(make_source(path)) + all_documents(make_source(path, "val"))
    assert sorted(documents) == sorted(paragraphs(60))


def test_parquet_column_and_missing_column(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    path = tmp_path / "data.parquet"
    parquet.write_table(pyarrow.table({"content": paragraphs(100), "id": list(range(100))}), path)
    train = all_documents(make_source(path, text_field="content"))
    val = all_documents(make_source(path, "val", text_field="content"))
    assert sorted(train + val) == sorted(paragraphs(100))
    with pytest.raises(UserError, match="no column 'text'; columns are: content, id"):
        make_source(path)


def test_saved_hugging_face_dataset_is_read_with_pyarrow(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    # the layout datasets' save_to_disk writes: a DatasetDict folder, one folder per split with
    # state.json naming Arrow *stream* files
    root = tmp_path / "saved"
    for split, texts in {"train": paragraphs(50), "test": ["held out one", "held out two"]}.items():
        folder = root / split
        folder.mkdir(parents=True)
        table = pyarrow.table({"text": texts})
        with pyarrow.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
            with pyarrow.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
        (folder / "dataset_info.json").write_text("{}")
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert sorted(all_documents(make_source(root))) == sorted(paragraphs(50))
    assert all_documents(make_source(root, "val")) == ["held out one", "held out two"]
    # a single saved split (no dataset_dict.json) is split by hash
    single = (all_documents(make_source(root / "train", val_percent=20))
              + all_documents(make_source(root / "train", "val", val_percent=20)))
    assert sorted(single) == sorted(paragraphs(50))


def test_user_errors_for_missing_and_empty_corpora(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        make_source(tmp_path / "nothing.txt")
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(UserError, match="the corpus is empty"):
        make_source(tmp_path / "blank.txt")
    (tmp_path / "one.txt").write_text("a single paragraph")
    with pytest.raises(UserError, match="no documents in the 'val' split"):
        make_source(tmp_path / "one.txt", "val", val_percent=1)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        make_source(tmp_path / "latin1.txt")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(UserError, match="no .txt, .md, .json, .jsonl or .parquet files"):
        make_source(empty_dir)
    with pytest.raises(UserError, match="families"):
        make_source("synthetic", families=["calculus"])


def test_stdlib_corpus_is_sorted_split_and_deterministic():
    train, val = make_source("stdlib", "train"), make_source("stdlib", "val")
    train_paths, val_paths = train.paths, val.paths
    assert train_paths == sorted(train_paths) and val_paths == sorted(val_paths)
    assert not set(train_paths) & set(val_paths)
    assert len(train_paths) > 200 and 0.01 < len(val_paths) / (len(train_paths) + len(val_paths)) < 0.1
    assert not any("site-packages" in str(path) for path in train_paths)
    assert make_source("stdlib", "val").paths == val_paths
    inputs, _ = next(PackedLoader(val, seq_len=64, batch_size=2))
    text = ByteTokenizer().decode(inputs[0].tolist())
    assert text  # real source bytes
    assert any(name.name == "os.py" for name in train_paths + val_paths)

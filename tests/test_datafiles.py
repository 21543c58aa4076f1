"""datafiles.py: a dataset directory's splits, named from its files' names as `datasets` names them, and the choice
of the train and eval splits (reading the files: tests/test_data.py, through data.read_examples)."""
import pytest

import datafiles

HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")  # ../shared/data/hh-rlhf


@pytest.mark.parametrize("name,split", [
    ("train-00000-of-00002.parquet", "train"),  # data/train-00000-of-00002.parquet
    ("train_prefs-00001-of-00003.parquet", "train_prefs"),
    ("train.jsonl", "train"),
    ("test.jsonl.gz", "test"),  # helpful-base/test.jsonl.gz
    ("helpful-base-test.jsonl.gz", "test"),  # the subset in the name
    ("red_team_attempts.jsonl.gz", "red_team_attempts"),  # Anthropic/hh-rlhf's other data: never a train split
    ("validation-00000-of-00001.json", "validation"),
])
def test_split_of_a_file(name, split):
    assert datafiles.split_of(name) == split


def make_dir(root, names: list[str]):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    return root


@pytest.mark.parametrize("names,train,eval", [
    (["data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet"], "train", "test"),  # trl-lib
    ([f"data/{s}_{k}-00000-of-00001.parquet" for s in ("train", "test") for k in ("prefs", "sft", "gen")],
     "train_prefs", "test_prefs"),  # HuggingFaceH4/ultrafeedback_binarized
    (["train.jsonl", "validation.jsonl"], "train", "validation"),
    (["data/train-00000-of-00001.parquet", "data/val-00000-of-00001.parquet"], "train", "val"),
    (["train.jsonl.gz"], "train", None),  # no test split: hold out examples of train
    (["my_train.json", "my_test.json"], "my_train", "my_test"),
])
def test_default_splits(tmp_path, names, train, eval):
    make_dir(tmp_path, names + ["README.md", ".cache/huggingface/test.parquet"])
    assert datafiles.choose_split(tmp_path, "auto") == train
    assert datafiles.choose_split(tmp_path, "auto", "eval", train=train, required=False) == eval


def test_split_choice_errors_list_the_splits(tmp_path):
    make_dir(tmp_path, [f"data/{s}_{k}-00000-of-00001.parquet" for s in ("train", "test") for k in ("sft", "gen")])
    assert datafiles.choose_split(tmp_path, "auto", "eval", train="train_sft") == "test_sft"  # the twin
    listed = "the splits are test_gen \\(1 file\\), test_sft \\(1 file\\), train_gen \\(1 file\\), train_sft"
    with pytest.raises(datafiles.DataError, match=f"^{tmp_path}: which train split\\? several names hold 'train'; "
                       f"{listed}.*name one with --split$"):
        datafiles.choose_split(tmp_path, "auto")
    with pytest.raises(datafiles.DataError, match="which eval split\\? several names hold 'test'"):
        datafiles.choose_split(tmp_path, "auto", "eval", train="train_gen_2", required=False)
    with pytest.raises(datafiles.DataError, match=f"^{tmp_path}: no split 'train'; {listed}"):
        datafiles.choose_split(tmp_path, "train")
    hh = make_dir(tmp_path / "hh", [f"{s}-test.jsonl.gz" for s in HH_SUBSETS])
    with pytest.raises(datafiles.DataError, match="which train split\\? none is named train or train_prefs or holds "
                       "'train'; the splits are test \\(4 files\\); name one with --data_split"):
        datafiles.choose_split(hh, "auto", option="--data_split")
    with pytest.raises(datafiles.DataError, match="no data files"):
        datafiles.choose_split(make_dir(tmp_path / "empty", ["README.md", "data/.x.parquet"]), "auto")

"""load_weights_only: every refusal is one line that names its cause, and never advises unpickling."""

import argparse

import pytest
import torch

from sam_cache.torch_files import TorchFileError, load_weights_only


def test_a_torch_file_of_tensors_loads_in_either_format(tmp_path):
    state = {"w": torch.arange(4.0), "epoch": 3}
    torch.save(state, tmp_path / "new.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("new.pt", "legacy.pt"):
        got = load_weights_only(tmp_path / name)
        assert torch.equal(got["w"], state["w"]) and got["epoch"] == 3


@pytest.mark.parametrize("content, cause", [
    (b"", "is empty"),
    (b"# a README, passed by mistake\n",
     "is not a torch file (torch.save writes a zip archive; this file starts with b'# a "),
    (b"\x00garbage", "is not a torch file"),
])
def test_what_is_not_a_torch_file_is_named_so(tmp_path, content, cause):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(TorchFileError) as info:
        load_weights_only(tmp_path / "x.pt")
    assert str(info.value).startswith(cause) and info.value.python_object is None
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)


def test_an_object_is_refused_by_its_class_and_the_message_never_advises_unpickling(tmp_path):
    torch.save({"w": torch.zeros(2), "args": argparse.Namespace(lr=1)}, tmp_path / "ckpt.pt")
    with pytest.raises(TorchFileError) as info:
        load_weights_only(tmp_path / "ckpt.pt")
    assert info.value.python_object == "argparse.Namespace"
    assert "holds a Python object (argparse.Namespace)" in str(info.value)
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)


def test_a_truncated_archive_is_unreadable_with_its_cause(tmp_path):
    torch.save({"w": torch.zeros(1000)}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(TorchFileError, match=r"^is not a readable torch file: \S"):
        load_weights_only(tmp_path / "cut.pt")

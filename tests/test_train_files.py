"""Atomic writes: a failed write leaves the previous file and no temporary behind."""
import pytest
import torch

from mdp_train import files


def test_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "ck.pt"
    files.save({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        files.save({"a": Boom()}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"]
    files.write_text(tmp_path / "r.json", "{}\n")
    assert (tmp_path / "r.json").read_text() == "{}\n"

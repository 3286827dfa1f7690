"""Output files and scores that must not lie: atomic writes through symlinks and onto devices or
FIFOs, non-finite scores refused by test / predict / fuse-scores, and `vmm predict` runs in which
nothing could be predicted. Real files and real Trainer runs on the tiny in-memory network of
test_classifier.py."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lightning_modules.io import atomic_write_bytes, atomic_write_text, check_writable_file


def test_atomic_write_to_a_symlink_writes_its_target_and_keeps_the_link(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "real.json").write_text("old\n", encoding="utf-8")
    link = tmp_path / "out.json"
    link.symlink_to(Path("store") / "real.json")  # relative, resolved from the link's directory
    chain = tmp_path / "chain.json"
    chain.symlink_to(link)
    atomic_write_text(chain, "new\n")
    assert chain.is_symlink() and link.is_symlink()
    assert (store / "real.json").read_text(encoding="utf-8") == "new\n"
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(store / "later.json")
    atomic_write_bytes(dangling, b"x")
    assert dangling.is_symlink() and (store / "later.json").read_bytes() == b"x"
    assert sorted(p.name for p in store.iterdir()) == ["later.json", "real.json"]  # no temporaries left
    assert check_writable_file(link, "--predictions") == link


def test_atomic_write_refuses_a_fifo_or_device_and_leaves_it(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "to_pipe"
    link.symlink_to(fifo)
    for target in (fifo, link):
        with pytest.raises(ValueError, match=rf"cannot write {target}: .*FIFO.*expected a regular file"):
            atomic_write_text(target, "x")
        with pytest.raises(ValueError, match=rf"--predictions: cannot write {target}: .*FIFO"):
            check_writable_file(target, "--predictions")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "to_pipe"]
    for device in ("/dev/full", "/dev/null"):
        if os.path.exists(device):
            with pytest.raises(ValueError, match=rf"--predictions: cannot write {device}: .*character device"):
                check_writable_file(device, "--predictions")
            assert stat.S_ISCHR(os.stat(device).st_mode)

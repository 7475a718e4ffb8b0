"""`atomic_write` never writes through a symlink: not at the target, not at its `.bak` (issue 29)."""

from __future__ import annotations

import os
from pathlib import Path

from specs.files import atomic_write, backup_path


def test_a_symlink_at_the_bak_path_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "cluster.yaml"
    path.write_text("old\n")
    backup_path(path).symlink_to(victim)
    assert atomic_write(path, "new\n") == backup_path(path)
    assert victim.read_text() == "precious\n"
    assert not backup_path(path).is_symlink() and backup_path(path).read_text() == "old\n"
    assert path.read_text() == "new\n"


def test_a_symlink_at_the_target_is_replaced_and_kept_as_a_link(tmp_path: Path) -> None:
    """The new file replaces the link (the file it pointed at is untouched, its text not copied into the .bak):
    the .bak is the link itself."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o600)
    path = tmp_path / "cluster.yaml"
    path.symlink_to(victim)
    atomic_write(path, "new\n")
    assert victim.read_text() == "precious\n"
    assert not path.is_symlink() and path.read_text() == "new\n"
    assert backup_path(path).is_symlink() and os.readlink(backup_path(path)) == str(victim)


def test_a_dangling_bak_link_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("old\n")
    backup_path(path).symlink_to(tmp_path / "would-be-created")
    atomic_write(path, "new\n")
    assert not (tmp_path / "would-be-created").exists()
    assert backup_path(path).read_text() == "old\n"

import stat

from fluxnb.base import files


def test_atomic_writes_get_the_umask_permissions_not_mkstemps_0600(tmp_path):
    """mkstemp makes 0600 files; a LoRA that ComfyUI (another user, a container) cannot read is no use."""
    files.atomic_write_text(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~files._UMASK
    assert not list(tmp_path.glob(".a.txt.*"))  # no temporary file left behind

import pytest

from mtrec.data.io import filesystem, is_local, is_local_fs, local_path


@pytest.mark.parametrize(
    ("url", "local", "path"),
    [
        ("/data/logs", True, "/data/logs"),
        ("./logs", True, "./logs"),
        ("~/work", True, "~/work"),
        ("file:///data/logs", True, "/data/logs"),
        ("s3://bucket/logs", False, "s3://bucket/logs"),
        ("memory://world", False, "memory://world"),
    ],
)
def test_local_urls_and_their_paths(url, local, path):
    assert is_local(url) is local
    assert local_path(url) == path


def test_local_filesystem_is_told_from_the_others(tmp_path):
    assert is_local_fs(filesystem(str(tmp_path))[0]) and is_local_fs(filesystem(f"file://{tmp_path}")[0])
    assert not is_local_fs(filesystem("memory://x")[0])

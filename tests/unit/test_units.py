from __future__ import annotations

import pytest

from reconciler.spec.units import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512Mi", 512 * 1024**2), ("512M", 512 * 1024**2), ("512MiB", 512 * 1024**2), ("512m", 512 * 1024**2),
        ("2G", 2 * 1024**3), ("2Gi", 2 * 1024**3), ("1.5Gi", 1536 * 1024**2), ("1T", 1024**4),
        ("4096", 4096), (4096, 4096), ("10K", 10240), ("100B", 100), (" 8 Gi ", 8 * 1024**3),
    ],
)
def test_parse_size_is_1024_based_like_qemu(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "12Q", "1.2.3G", "-1G", "G", "0.3B", "1e3", True, 1.5, -5])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_size_is_shortest_exact() -> None:
    assert format_size(512 * 1024**2) == "512Mi"
    assert format_size(1024**3) == "1Gi"
    assert format_size(1536 * 1024**2) == "1536Mi"
    assert format_size(1000) == "1000"
    assert parse_size(format_size(123 * 1024**2 + 512)) == 123 * 1024**2 + 512

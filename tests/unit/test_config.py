"""Settings: checked when they are read, memory sizes parsed once into bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from kernelpool.config import Settings, load_settings, memory_limit


def test_network_settings_are_checked(tmp_path: Path) -> None:
    s = load_settings(data_dir=tmp_path)
    assert (s.kernel_network, s.kernel_network_range, s.kernel_network_allow, s.network_prefix) == \
        ("egress", "10.201.0.0/16", [], "kp")
    s = load_settings(data_dir=tmp_path, kernel_network_allow="10.20.30.0/24, 192.168.5.5", network_prefix="kpa")
    assert s.kernel_network_allow == ["10.20.30.0/24", "192.168.5.5/32"]
    bad = [
        {"kernel_network": "bridge"},
        {"kernel_network_range": "8.8.8.0/24"},  # not private
        {"kernel_network_range": "10.0.0.1/32"},  # room for no pair
        {"kernel_network_range": "10.0.0.1/24"},  # host bits set
        {"kernel_network_allow": "10.0.0.0/33"},
        {"network_prefix": "kp1"},  # must end in a letter
        {"network_prefix": "Kp"},
        {"network_prefix": "kpabcdef"},
        {"network_prefix": "kpabcd", "uid_max": 1234567890},  # kpabcd1234567890 > 15 characters
    ]
    for values in bad:
        with pytest.raises(ValueError):
            load_settings(data_dir=tmp_path, **values)


def test_memory_limits_are_parsed_once_into_bytes() -> None:
    s = Settings(kernel_memory="512M", user_memory="none")
    assert (s.kernel_memory, s.user_memory) == (512 << 20, None)
    assert Settings().kernel_memory == 2 << 30, "the default is bytes too"
    assert [memory_limit(v) for v in ("max", "None", "", None, "1G", 4096)] == [None, None, None, None, 1 << 30, 4096]
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ValidationError, match="kernel_memory"):
            Settings(kernel_memory=bad)


def test_a_per_user_cap_over_the_servers_is_refused(tmp_path: Path) -> None:
    for per_user, overall in (("max_kernels_per_user", "max_kernels"), ("max_sessions_per_user", "max_sessions"),
                              ("max_result_bytes_per_user", "max_result_bytes")):
        with pytest.raises(ValueError, match=f"{per_user} must not exceed {overall}"):
            load_settings(data_dir=tmp_path, **{per_user: 20, overall: 10})
    with pytest.raises(ValueError, match="uid_min must not exceed uid_max"):
        load_settings(data_dir=tmp_path, uid_min=30000, uid_max=29999)

"""The command line: its setting flags are made from the settings' fields; times are read as people write them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kernelpool.cli import _settings, build_parser, parse_when


def test_parse_when() -> None:
    assert abs(parse_when("2h") - (time.time() + 7200)) < 5
    assert parse_when("2001-01-01T00:00:00") == 978307200.0
    with pytest.raises(Exception):
        parse_when("soon")


def test_setting_options_are_made_from_the_settings_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parse = build_parser().parse_args
    s = _settings(parse(["serve", "--data-dir", str(tmp_path), "--port", "0", "--pool-size", "3", "--log-json",
                         "--kernel-network", "none", "--insecure-no-sandbox", "--log-level", "debug"]))
    assert (s.port, s.pool_size, s.log_json, s.kernel_network, s.insecure_no_sandbox, s.log_level) == \
        (0, 3, True, "none", True, "debug")
    monkeypatch.setenv("KERNELPOOL_POOL_SIZE", "5")
    s = _settings(parse(["serve", "--data-dir", str(tmp_path)]))
    assert (s.port, s.pool_size, s.log_json, s.insecure_no_sandbox, s.data_dir) == (8765, 5, False, False, tmp_path)
    # a user's override is not the server's setting
    args = parse(["users", "set-limits", "ann", "--memory", "1G", "--cpus", "0.5", "--data-dir", str(tmp_path)])
    assert (args.kernel_memory, args.kernel_cpus) == ("1G", 0.5) and _settings(args).kernel_memory == 2 << 30
    with pytest.raises(SystemExit):
        parse(["serve", "--port", "eighty"])

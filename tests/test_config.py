"""Config loading: defaults < TOML file < CLI flags; every error reported at once."""
from __future__ import annotations

from pathlib import Path

import pytest

from sci_node.cli import main
from sci_node.config import Destination, load_config, parse_destination
from sci_node.errors import ConfigError


def test_precedence_file_then_flags(tmp_path: Path) -> None:
    cfg_file = tmp_path / "node.toml"
    cfg_file.write_text(
        'ae_title = "FROMFILE"\nport = 2000\nstable_seconds = 4\n'
        'destinations = ["PACS@10.0.0.5:104"]\nallowed_aes = ["SCANNER@127.0.0.1"]\n'
        '[limits]\nmax_associations = 3\n'
    )
    cfg = load_config(cfg_file, {"port": 3000, "ae_title": None})
    assert cfg.ae_title == "FROMFILE"
    assert cfg.port == 3000
    assert cfg.stable_seconds == 4.0
    assert cfg.destinations == (Destination("PACS", "10.0.0.5", 104),)
    assert cfg.allowed_aes[0].matches("SCANNER", "127.0.0.1")
    assert not cfg.allowed_aes[0].matches("SCANNER", "10.1.1.1")
    assert cfg.limits.max_associations == 3


def test_every_error_reported_at_once(tmp_path: Path) -> None:
    cfg_file = tmp_path / "bad.toml"
    cfg_file.write_text('port = "x"\nbogus = 1\ndestinations = ["nope"]\n[limits]\nmax_pdu = 5\n')
    with pytest.raises(ConfigError) as info:
        load_config(cfg_file)
    msg = str(info.value)
    for fragment in ("port", "bogus: unknown key", "'nope'", "limits.max_pdu: unknown key"):
        assert fragment in msg


def test_destination_forms() -> None:
    assert parse_destination("DEST@127.0.0.1 11113") == Destination("DEST", "127.0.0.1", 11113)
    assert parse_destination("DEST@host:104").port == 104
    with pytest.raises(ConfigError, match="70000"):
        parse_destination("DEST@host:70000")


def test_cli_reports_config_error_as_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["status", "--config", str(tmp_path / "missing.toml")])
    assert rc == 2
    assert "missing.toml" in capsys.readouterr().err


def test_example_config_is_valid() -> None:
    from sci_node.config import REPO_ROOT

    cfg = load_config(REPO_ROOT / "sci-node.example.toml")
    assert cfg.destinations[0].ae_title == "ORTHANC"
    assert cfg.routing.lesion_sequences == ("T2w", "T2starw")


def test_torch_threads_default_auto_and_bad_value(tmp_path: Path) -> None:
    import os

    import torch

    from sci_node.models.predict_seg import configure_threads

    assert load_config(None).torch_threads == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("torch_threads = -1\n")
    with pytest.raises(ConfigError, match="torch_threads: -1"):
        load_config(bad)
    before = torch.get_num_threads()
    try:
        cpus = len(os.sched_getaffinity(0))
        assert configure_threads(0) == max(1, cpus - 1) == torch.get_num_threads()
        assert configure_threads(0, workers=cpus) == 1
        assert configure_threads(3) == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_broker_urls_without_a_password_on_another_host_are_refused_and_never_printed(tmp_path: Path) -> None:
    from sci_node.config import redact_url

    ok = {"redis://127.0.0.1:6379/0", "redis://localhost:6379/0", "redis://[::1]:6379/0",
          "redis://:pw@10.0.0.5:6379/0", "rediss://sci:pw@redis.example:6380/0?ssl_ca_certs=/etc/ca.pem"}
    for url in ok:
        assert load_config(None, {"engine": {"kind": "celery", "broker_url": url}}).engine.broker_url == url
    for url in ("redis://10.0.0.5:6379/0", "rediss://sci@redis.example:6380/0", "amqp://rabbit:5672//"):
        with pytest.raises(ConfigError, match="is on another host and has no password"):
            load_config(None, {"engine": {"kind": "celery", "broker_url": url, "store_url": "redis://:pw@r/0"}})
        allowed = {"kind": "celery", "broker_url": url, "store_url": "redis://:pw@r/0",
                   "allow_unauthenticated_broker": True}
        assert load_config(None, {"engine": allowed}).engine.allow_unauthenticated_broker
    with pytest.raises(ConfigError) as err:
        load_config(None, {"engine": {"kind": "celery", "broker_url": "http://u:hunter2@x/0"}})
    assert "hunter2" not in str(err.value) and "http://u:***@x/0" in str(err.value)
    assert redact_url("rediss://u:p@h:1/0?ssl_ca_certs=/a@b") == "rediss://u:***@h:1/0?ssl_ca_certs=/a@b"
    assert redact_url("redis://:p@h/0") == "redis://:***@h/0" and redact_url("redis://h/0") == "redis://h/0"


def test_reactor_poll_busy_seconds_validated() -> None:
    assert load_config(None, {}).limits.reactor_poll_busy_seconds == 0.0001  # adaptive by default
    assert load_config(None, {"limits": {"reactor_poll_busy_seconds": 0}}).limits.reactor_poll_busy_seconds == 0
    for bad in (-0.001, 0.002):  # negative; slower than the idle poll (0.001)
        with pytest.raises(ConfigError, match=f"limits.reactor_poll_busy_seconds: {bad}"):
            load_config(None, {"limits": {"reactor_poll_busy_seconds": bad}})

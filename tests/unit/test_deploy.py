"""The deployment files keep their promises: hardened unit with reload, non-root image, compose with PG."""

from __future__ import annotations

import configparser
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "pop-connector.service")
    return parser


def test_systemd_unit_is_hardened_and_reloads_with_sighup() -> None:
    service = unit()["Service"]
    assert service["User"] == "pop-connector" and service["StateDirectory"] == "pop-connector"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    for setting, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
    }.items():
        assert service[setting] == value, setting


def test_container_runs_unprivileged_with_state_in_a_volume() -> None:
    lines = (DEPLOY / "Containerfile").read_text().splitlines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and all(not user.startswith(("0", "root")) for user in users)
    assert 'VOLUME ["/var/lib/pop-connector"]' in lines
    assert any(line.startswith("HEALTHCHECK") for line in lines)


def test_compose_runs_the_connector_with_postgresql() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert services["db"]["image"].startswith("postgres:")
    connector = services["connector"]
    assert connector["depends_on"]["db"]["condition"] == "service_healthy"
    assert "state:/var/lib/pop-connector" in connector["volumes"]
    assert all(port.startswith("127.0.0.1:") for port in connector["ports"])
    assert "PGPASSWORD" in connector["environment"]

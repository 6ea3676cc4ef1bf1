"""Pilot down: sidecars keep serving their last config; pilot back: they resync. An invalid
rule never reaches a proxy: the last valid rules stay in force."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import Echo
from tests.integration.mesh_helpers import (
    PilotProcess,
    destination_rule,
    eventually,
    outbound_port,
    served_by,
    sidecar_config,
    to,
    virtual_service,
)

pytestmark = pytest.mark.slow


def route_all_to(subset: str, weight_total: int = 100) -> list[dict[str, Any]]:
    other = "green" if subset == "blue" else "blue"
    route = {"route": [to("shop", subset, weight_total), to("shop", other, 0)]}
    return [destination_rule("shop", "color", "blue", "green"), virtual_service("shop", route)]


def abort_all(host: str, status: int) -> dict[str, Any]:
    fault = {"abort": {"httpStatus": status, "percentage": {"value": 100}}}
    return virtual_service(host, {"fault": fault, "route": [{"destination": {"host": host}}]})


@pytest.fixture
def colors() -> Iterator[dict[str, Echo]]:
    started = {name: Echo(name) for name in ("blue", "green")}
    yield started
    for echo in started.values():
        echo.stop()


def test_sidecars_keep_serving_without_pilot_and_resync_when_it_returns(
    tmp_path: Path, colors: dict[str, Echo], make_proxy: Any
) -> None:
    pilot = PilotProcess(tmp_path)
    try:
        for name, echo in colors.items():
            pilot.register("shop", echo.port, {"color": name}, service_port=80)
        pilot.write_rules("shop.yaml", *route_all_to("blue"))
        config = sidecar_config(pilot, "frontend")
        proxy = make_proxy(config)
        port = outbound_port(config)
        eventually(lambda: served_by(port, "shop", 10) == {"blue": 10})
    finally:
        pilot.stop()

    # pilot is gone: the sidecar keeps serving what it had
    assert served_by(port, "shop", 20) == {"blue": 20}
    pilot.write_rules("shop.yaml", *route_all_to("green"))  # changed while pilot is down

    pilot.start()  # same ports, same registry file
    try:
        took = eventually(lambda: served_by(port, "shop", 10) == {"green": 10}, timeout=20)
        assert took < 15
        assert "xDS stream to" in proxy.output()
    finally:
        pilot.stop()


def test_an_invalid_rule_is_rejected_and_the_last_valid_rules_stay(
    tmp_path: Path, colors: dict[str, Echo], make_proxy: Any
) -> None:
    pilot = PilotProcess(tmp_path)
    try:
        for name, echo in colors.items():
            pilot.register("shop", echo.port, {"color": name}, service_port=80)
        pilot.write_rules("shop.yaml", *route_all_to("blue"))
        config = sidecar_config(pilot, "frontend")
        make_proxy(config)
        port = outbound_port(config)
        eventually(lambda: served_by(port, "shop", 10) == {"blue": 10})
        pushes = pilot.debug()["pushes"]

        pilot.write_rules("shop.yaml", *route_all_to("green", weight_total=90))  # 90 + 0 != 100
        eventually(lambda: "shop.yaml" in pilot.output() and "weight" in pilot.output())
        assert served_by(port, "shop", 20) == {"blue": 20}
        assert pilot.debug()["pushes"] == pushes

        # another file's valid change still goes through while shop.yaml is broken
        pilot.register("catalog", colors["green"].port, service_port=80)
        pilot.write_rules("catalog.yaml", abort_all("catalog", 418))
        eventually(lambda: served_by(port, "catalog", 4) == {"418": 4})
        assert served_by(port, "shop", 20) == {"blue": 20}

        pilot.write_rules("shop.yaml", *route_all_to("green"))  # fixed: it goes through
        eventually(lambda: served_by(port, "shop", 10) == {"green": 10})
    finally:
        pilot.stop()

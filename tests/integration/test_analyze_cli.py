"""``shoal analyze DIR`` as a user runs it: the installed command, exit status and output."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SHOAL = str(Path(sys.executable).parent / "shoal")

REVIEWS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v2}
      weight: 10
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def analyze(cwd: Path, directory: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SHOAL, "analyze", directory],
        cwd=cwd,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
        check=False,
    )


def test_a_clean_directory_exits_0(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "reviews.yaml").write_text(REVIEWS)

    result = analyze(tmp_path, "rules")

    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "✔ No validation issues found when analyzing rules (2 resources)\n"


def test_shoal_kinds_count_as_resources(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "reviews.yaml").write_text(REVIEWS)
    (tmp_path / "rules" / "breaker.yaml").write_text(
        "apiVersion: shoal.io/v1\nkind: CircuitBreakerPolicy\nmetadata: {name: b}\n"
        "spec: {host: reviews, errorRatio: 0.5}\n"
    )

    result = analyze(tmp_path, "rules")

    assert result.stdout == "✔ No validation issues found when analyzing rules (3 resources)\n"


def test_errors_are_listed_one_per_line_and_exit_1(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "reviews.yaml").write_text(
        REVIEWS.replace("weight: 10", "weight: 150").replace("v2}}\n", "v2}}\n---\n")
        + textwrap.dedent(
            """
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {name: api}
            spec: {hosts: [api.example.com], ports: [{number: 80, name: http}], resolution: DNS}
            """
        )
    )
    (rules / "broken.yaml").write_text("spec: [")
    (rules / "deploy.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n"
    )

    result = analyze(tmp_path, "rules")

    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "Error: rules/broken.yaml: invalid YAML at line 1, column 8: expected the node content, "
        "but found '<stream end>'",
        "Error: rules/deploy.yaml: Deployment default/web: unsupported kind Deployment "
        "(apps/v1); Shoal reads networking.istio.io and shoal.io/v1 resources",
        "Error: rules/reviews.yaml#0: VirtualService default/reviews: "
        "spec.http[0].route[1].weight: must be an integer 0-100, not 150",
        "✘ 3 errors found when analyzing rules (2 valid resources)",
    ]


def test_a_subset_no_rule_defines_is_reported(tmp_path: Path) -> None:
    (tmp_path / "reviews.yaml").write_text(REVIEWS.replace("subset: v2}", "subset: v3}"))

    result = analyze(tmp_path, ".")

    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "Error: reviews.yaml#0: VirtualService default/reviews: "
        "spec.http[0].route[1].destination.subset: subset 'v3' is not defined by "
        "DestinationRule default/reviews",
        "✘ 1 error found when analyzing . (1 valid resource)",
    ]


def test_a_missing_directory_exits_1(tmp_path: Path) -> None:
    result = analyze(tmp_path, "nowhere")

    assert (result.returncode, result.stdout) == (1, "Error: nowhere: not a directory\n")


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    result = analyze(tmp_path, "--no-such-option")

    assert result.returncode == 2
    assert "usage: shoal analyze" in result.stderr

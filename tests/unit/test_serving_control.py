"""The serving-control request checks (no services): nothing changes on a bad form."""

from __future__ import annotations

import pytest

from ml.serving_control import ACTIONS, ControlError, check_request, main


def test_the_three_actions():
    assert ACTIONS == ("rollback", "pin", "promote")
    assert check_request("rollback", "  v7 mislabels sports ", None) == ("v7 mislabels sports", None)
    assert check_request("pin", "hold v5", 5) == ("hold v5", "5")
    assert check_request("pin", "hold v5", " 5 ") == ("hold v5", "5")
    assert check_request("promote", "checked by hand", "") == ("checked by hand", None)


@pytest.mark.parametrize(
    ("action", "reason", "version", "says"),
    [
        ("rollback", "", None, "a reason is required"),
        ("rollback", "  ok ", None, "a reason is required"),  # 2 characters after stripping
        ("pin", None, 3, "a reason is required"),
        ("pin", "why not", None, "pin needs a version number"),
        ("pin", "why not", "champion", "pin needs a version number"),
        ("rollback", "why not", 3, "rollback takes no version"),
        ("promote", "why not", "2", "promote takes no version"),
        ("delete", "why not", None, "unknown action 'delete'"),
    ],
)
def test_a_bad_request_is_refused_with_a_reason(action, reason, version, says):
    with pytest.raises(ControlError, match=says):
        check_request(action, reason, version)


def test_cli_refuses_before_touching_anything(capsys):
    """No stack is running for unit tests: a refused request must fail before any connection."""
    assert main(["pin", "--reason", "hold it"]) == 1
    assert "pin needs a version number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["rollback"])  # --reason is required by the parser

"""``python -m core users``: list, add (policy-checked), deactivate, activate, role, reset, unlock; refusals are
one ``error: ...`` line with exit status 2."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from db.models import AuditEvent
from db.session import read_scope
from services import accounts
from services.cli import main

PASSWORD = "violet tram quarry"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["users", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _refused(capsys, *argv: str) -> str:
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == "", (code, out, err)
    (line,) = err.splitlines()
    assert line.startswith("error: ")
    return line


def test_add_and_list_as_before_now_with_the_policy(workspace, capsys):
    code, out, _ = _run(
        capsys, "add", "--username", "pat", "--password", PASSWORD, "--role", "pi", "--display-name", "Pat"
    )
    assert code == 0 and re.fullmatch(r"added pi pat \(id \d+\)\n", out)
    code, out, _ = _run(capsys, "add", "--username", "rita", "--password", PASSWORD)
    assert code == 0 and out.startswith("added reader rita")
    assert _refused(capsys, "add", "--username", "bob", "--password", "a") == (
        "error: Password not accepted: it has 1 characters, at least 10 are needed; "
        "it uses fewer than 4 different characters."
    )
    assert "published demo password" in _refused(capsys, "add", "--username", "bob", "--password", "demo-pi")
    assert "exists already" in _refused(capsys, "add", "--username", "rita", "--password", PASSWORD)
    assert _refused(capsys, "add", "--username", "bob") == "error: users add needs --username and --password"
    code, out, _ = _run(capsys, "list")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[1:3] for line in lines] == [["pat", "pi"], ["rita", "reader"]]
    assert lines[0].endswith("Pat") and "[" not in out


def test_deactivate_activate_role_reset_and_unlock(workspace, capsys):
    for name, role in (("pat", "pi"), ("rita", "reader")):
        assert _run(capsys, "add", "--username", name, "--password", PASSWORD, "--role", role)[0] == 0
    assert "last active principal investigator" in _refused(capsys, "deactivate", "pat")
    assert "last active principal investigator" in _refused(capsys, "role", "pat", "--role", "reader")
    assert _refused(capsys, "role", "rita") == "error: users role needs --role (pi, clinician, reader)"
    assert (
        _refused(capsys, "deactivate") == "error: users deactivate needs the USERNAME (see `python -m core users list`)"
    )
    assert "no account named 'zed'" in _refused(capsys, "deactivate", "zed")
    assert _run(capsys, "deactivate", "rita")[1] == "deactivated rita; its open sessions end\n"
    assert "[inactive]" in _run(capsys, "list")[1]
    assert _run(capsys, "activate", "rita")[1] == "activated rita\n"
    assert _run(capsys, "role", "rita", "--role", "pi")[1] == "rita now has the pi role; its open sessions end\n"
    code, out, _ = _run(capsys, "reset", "rita")
    temporary = re.search(r"temporary password for rita \(shown only now\): (\S+)\n", out).group(1)
    assert code == 0 and "must set a new password" in out
    assert "must change password" in _run(capsys, "list")[1]
    assert accounts.sign_in("rita", temporary, "ip:10.2.2.2").user.must_change_password
    assert "it has 5 characters" in _refused(capsys, "reset", "rita", "--password", "short")
    code, out, _ = _run(capsys, "reset", "rita", "--password", "chosen by the pi 9")
    assert code == 0 and "chosen by the pi 9" not in out
    assert accounts.sign_in("rita", "chosen by the pi 9", "ip:10.2.2.3").ok
    assert _run(capsys, "unlock", "rita")[1] == "sign-in for rita unlocked (it was not locked)\n"
    with read_scope() as s:
        events = s.execute(select(AuditEvent.action, AuditEvent.detail).order_by(AuditEvent.id)).all()
    actions = [action for action, _ in events if action.startswith("user_")]
    details = [detail for action, detail in events if action == "password_reset"]
    assert actions == ["user_added", "user_added", "user_deactivated", "user_activated", "user_role_changed"]
    assert details == [{"target": "rita", "via": "cli"}] * 2


@pytest.mark.parametrize("action", ["deactivate", "activate", "reset", "unlock"])
def test_unknown_accounts_are_refused(workspace, capsys, action):
    assert _refused(capsys, action, "nobody") == "error: There is no account named 'nobody'."

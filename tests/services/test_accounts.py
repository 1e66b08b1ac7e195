"""Accounts: throttled sign-in (backoff, lockout per account and per client, unlock), the password policy, password
changes, the PI's administration (last-PI rule), the demo rule, sessions that end, and the OIDC account mapping."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from db import repo
from db.models import AuditEvent, SignInAttempt
from db.session import init_db, read_scope, session_scope
from services import accounts
from services.accounts import ACCOUNT_THROTTLE, CLIENT_THROTTLE, AccountError, PolicyError

T0 = datetime(2030, 5, 4, 10, 0, tzinfo=UTC)
PASSWORD = "correct-horse-42"
CLIENT = "ip:10.0.0.7"


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def users(workspace) -> dict[str, int]:
    init_db()
    with session_scope() as s:
        return {
            name: repo.create_user(s, name, PASSWORD, role).id
            for name, role in (("ana", "pi"), ("ben", "clinician"), ("cid", "reader"))
        }


def _events(action: str | None = None) -> list[tuple[str, str | None, dict]]:
    with read_scope() as s:
        stmt = select(AuditEvent.action, AuditEvent.username, AuditEvent.detail).order_by(AuditEvent.id)
        if action is not None:
            stmt = stmt.where(AuditEvent.action == action)
        return [(a, u, dict(d or {})) for a, u, d in s.execute(stmt)]


def _fail_until_locked(name: str, client: str = CLIENT, start: float = 0.0) -> float:
    """Wrong passwords for ``name``, each as soon as the backoff allows, until the name locks; returns the moment
    (seconds after T0) of the locking failure."""
    t = start
    for failures in range(1, ACCOUNT_THROTTLE.lock_after + 1):
        result = accounts.sign_in(name, "wrong-password", client, now=_at(t))
        assert result.reason in ("wrong password", "unknown username"), result
        if failures < ACCOUNT_THROTTLE.lock_after:
            t += ACCOUNT_THROTTLE.wait_after(failures).total_seconds() + 0.01
    assert "locked" in result.message
    return t


def test_right_password_signs_in_and_is_recorded(users):
    result = accounts.sign_in(" ana ", PASSWORD, CLIENT, now=T0)
    assert result.ok and result.user.username == "ana" and result.at == T0 and result.message == ""
    with read_scope() as s:
        rows = s.execute(select(SignInAttempt.username, SignInAttempt.client, SignInAttempt.success)).all()
    assert rows == [("ana", CLIENT, True)]
    assert [(a, d["client"]) for a, _, d in _events("sign_in")] == [("sign_in", CLIENT)]


def test_failures_back_off_exponentially_then_lock_even_the_right_password(users):
    assert accounts.sign_in("ana", "nope-nope", CLIENT, now=_at(0)).reason == "wrong password"
    second = accounts.sign_in("ana", "nope-nope", CLIENT, now=_at(0.1))
    assert second.reason == "wrong password" and "3 more failed attempts lock" in second.message
    # two failures in a row: the next attempt waits 1 s, and even the right password is not checked meanwhile
    early = accounts.sign_in("ana", PASSWORD, CLIENT, now=_at(0.5))
    assert (early.ok, early.reason, early.message) == (
        False,
        "backoff",
        "Too many failed attempts: wait 1 s, then try again.",
    )
    assert accounts.sign_in("ana", "nope-nope", CLIENT, now=_at(1.2)).reason == "wrong password"  # 3rd: wait 2 s
    assert accounts.sign_in("ana", PASSWORD, CLIENT, now=_at(3.0)).reason == "backoff"
    assert accounts.sign_in("ana", "nope-nope", CLIENT, now=_at(3.3)).reason == "wrong password"  # 4th: wait 4 s
    assert accounts.sign_in("ana", PASSWORD, CLIENT, now=_at(7.0)).reason == "backoff"
    fifth = accounts.sign_in("ana", "nope-nope", CLIENT, now=_at(7.4))
    assert "locked after 5 failed attempts" in fifth.message and "10:15 UTC" in fifth.message
    locked = accounts.sign_in("ana", PASSWORD, CLIENT, now=_at(60))
    assert (locked.ok, locked.reason) == (False, "account locked")
    assert "even with the right password" in locked.message and "principal investigator" in locked.message
    # from another client too: the lock is the account's
    assert accounts.sign_in("ana", PASSWORD, "ip:10.9.9.9", now=_at(120)).reason == "account locked"
    assert accounts.sign_in("ana", PASSWORD, CLIENT, now=_at(7.4 + 15 * 60 - 1)).reason == "account locked"
    assert [d["scope"] for _, _, d in _events("sign_in_locked")] == ["account"]
    refused = [d["reason"] for _, _, d in _events("sign_in_refused")]
    assert refused == ["backoff", "backoff", "backoff", "account locked", "account locked", "account locked"]
    assert len(_events("sign_in_failed")) == 5  # refusals are audited, not counted
    # the lockout runs out 15 minutes after the fifth failure: the right password works, the unlock is audited once
    assert accounts.sign_in("ana", PASSWORD, CLIENT, now=_at(7.4 + 15 * 60 + 1)).ok
    assert [d["why"] for _, _, d in _events("sign_in_unlocked")] == ["lockout ran out"]
    assert accounts.sign_in("ana", PASSWORD, CLIENT, now=_at(7.4 + 15 * 60 + 2)).ok
    assert len(_events("sign_in_unlocked")) == 1


def test_a_success_starts_the_count_again_and_old_failures_leave_the_window(users):
    for t in (0, 0.1):
        accounts.sign_in("ben", "nope-nope", CLIENT, now=_at(t))
    assert accounts.sign_in("ben", PASSWORD, CLIENT, now=_at(1.2)).ok
    assert accounts.sign_in("ben", "nope-nope", CLIENT, now=_at(1.3)).message.startswith("Unknown username")
    assert accounts.sign_in("ben", "nope-nope", CLIENT, now=_at(1.4)).reason == "wrong password"
    # four failures spread over more than the window never lock
    late = 1.4 + ACCOUNT_THROTTLE.window.total_seconds() + 1
    for t in (late, late + 1.1, late + 3.2):
        assert accounts.sign_in("ben", "nope-nope", CLIENT, now=_at(t)).reason == "wrong password"
    assert accounts.sign_in("ben", PASSWORD, CLIENT, now=_at(late + 7.3)).ok


def test_unknown_names_are_throttled_and_answered_like_real_ones_with_a_real_verify(users, monkeypatch):
    verified = []
    real = repo.verify_password
    monkeypatch.setattr(repo, "verify_password", lambda stored, pw: verified.append(stored) or real(stored, pw))
    messages = {}
    for name in ("ana", "nobody"):
        results = [accounts.sign_in(name, "nope-nope", CLIENT, now=_at(t)) for t in (0, 0.1, 0.2)]
        messages[name] = [r.message for r in results]
    assert messages["ana"] == messages["nobody"]
    assert messages["nobody"][2].startswith("Too many failed attempts")
    assert len(verified) == 4 and verified[2] is None  # the unknown name still pays for an Argon2 verify
    assert [d["reason"] for _, _, d in _events("sign_in_failed")][-2:] == ["unknown username", "unknown username"]


def test_a_client_that_tries_many_names_backs_off_and_locks_whatever_the_name(users):
    t = 0.0
    for failures in range(1, CLIENT_THROTTLE.lock_after + 1):
        result = accounts.sign_in(f"guess{failures}", "nope-nope", CLIENT, now=_at(t))
        assert result.reason == "unknown username", (failures, result)
        t += CLIENT_THROTTLE.wait_after(failures).total_seconds() + 0.01
    assert t < CLIENT_THROTTLE.window.total_seconds()  # the lockout is reachable within the window
    refused = accounts.sign_in("ana", PASSWORD, CLIENT, now=_at(t))
    assert refused.reason == "client locked" and "from this computer" in refused.message
    assert accounts.sign_in("ana", PASSWORD, "ip:10.0.0.8", now=_at(t)).ok  # another client is not affected
    assert [d["scope"] for _, _, d in _events("sign_in_locked")] == ["client"]


def test_a_success_does_not_reset_the_client_count(users):
    t = 0.0
    for failures in range(1, CLIENT_THROTTLE.backoff_after + 1):
        accounts.sign_in(f"guess{failures}", "nope-nope", CLIENT, now=_at(t))
        t += 0.01
    assert accounts.sign_in("ana", PASSWORD, CLIENT, now=_at(t)).reason == "backoff"
    assert accounts.sign_in("ana", PASSWORD, CLIENT, now=_at(t + 1.1)).ok
    assert accounts.sign_in("guess-again", "nope-nope", CLIENT, now=_at(t + 1.2)).reason == "unknown username"
    assert accounts.sign_in("ben", PASSWORD, CLIENT, now=_at(t + 1.3)).reason == "backoff"


def test_a_pi_unlocks_a_locked_account_and_a_reset_password_lifts_the_lock_too(users):
    t = _fail_until_locked("cid")
    assert accounts.unlock("cid", actor_id=users["ana"], now=_at(t + 1)) is True
    assert accounts.sign_in("cid", PASSWORD, CLIENT, now=_at(t + 2)).ok
    assert [d["why"] for _, _, d in _events("sign_in_unlocked")] == ["unlocked"]
    t = _fail_until_locked("cid", start=t + 3)
    temporary = accounts.reset_password("cid", actor_id=users["ana"], now=_at(t + 1))
    signed = accounts.sign_in("cid", temporary, CLIENT, now=_at(t + 2))
    assert signed.ok and signed.user.must_change_password
    assert [d["why"] for _, _, d in _events("sign_in_unlocked")] == ["unlocked", "password reset"]
    with pytest.raises(AccountError, match="Only an active principal investigator"):
        accounts.unlock("cid", actor_id=users["ben"])


@pytest.mark.parametrize(
    ("password", "username", "problems"),
    [
        ("short", "", ["it has 5 characters, at least 10 are needed"]),
        (
            "x" * 257,
            "",
            ["it has 257 characters, at most 256 are allowed", "it uses fewer than 4 different characters"],
        ),
        ("maria-rossi-2024", "maria-rossi", ["it contains the username"]),
        (
            "pi",
            "pi",
            [
                "it has 2 characters, at least 10 are needed",
                "it contains the username",
                "it uses fewer than 4 different characters",
            ],
        ),
        ("demo-reader2", "", ["it is a published demo password"]),
        ("Password2024!", "", ["it is a common password (or one with digits or symbols added)"]),
        ("1234567890", "", ["it is a common password (or one with digits or symbols added)"]),
        ("abababababab", "", ["it uses fewer than 4 different characters"]),
        ("happiness-is-free", "pi", []),  # a two-letter username inside a word is not the username
        ("violet tram quarry", "ana", []),
    ],
)
def test_the_password_policy_says_exactly_what_is_wrong(password, username, problems):
    assert accounts.password_problems(password, username) == problems


def test_adding_accounts_checks_the_name_the_role_and_the_policy(users):
    with pytest.raises(PolicyError) as refused:
        accounts.add_user("dora", "dora1234", "reader")
    assert str(refused.value) == (
        "Password not accepted: it has 8 characters, at least 10 are needed; it contains the username."
    )
    with pytest.raises(AccountError, match="lower-case letters"):
        accounts.add_user("Dora Smith", "violet tram quarry", "reader")
    with pytest.raises(AccountError, match="Unknown role"):
        accounts.add_user("dora", "violet tram quarry", "admin")
    with pytest.raises(AccountError, match="exists already"):
        accounts.add_user("ana", "violet tram quarry", "reader")
    with pytest.raises(AccountError, match="Only an active principal investigator"):
        accounts.add_user("dora", "violet tram quarry", "reader", actor_id=users["ben"])
    dora = accounts.add_user("dora@hospital.org", "violet tram quarry", "reader", "Dr Dora", actor_id=users["ana"])
    assert (dora.username, dora.display_name, dora.role, dora.must_change_password) == (
        "dora@hospital.org",
        "Dr Dora",
        "reader",
        False,
    )
    assert _events("user_added")[-1][2] == {"target": "dora@hospital.org", "role": "reader", "via": "app"}
    assert accounts.sign_in("dora@hospital.org", "violet tram quarry", CLIENT).ok


def test_changing_the_own_password_needs_the_current_one_and_ends_other_sessions(users):
    cid = users["cid"]
    with pytest.raises(AccountError, match="current password is wrong"):
        accounts.change_password(cid, "not-it-at-all", "violet tram quarry", client=CLIENT, now=_at(0))
    assert [d["reason"] for _, _, d in _events("password_change_failed")] == ["wrong current password"]
    with pytest.raises(PolicyError, match="it has 5 characters"):
        accounts.change_password(cid, PASSWORD, "short", client=CLIENT, now=_at(1))
    with pytest.raises(PolicyError, match="it is the current password"):
        accounts.change_password(cid, PASSWORD, PASSWORD, client=CLIENT, now=_at(1))
    with pytest.raises(AccountError, match="differ"):
        accounts.change_password(cid, PASSWORD, "violet tram quarry", repeat="violet tram quary", client=CLIENT)
    changed = accounts.change_password(cid, PASSWORD, "violet tram quarry", client=CLIENT, now=_at(2))
    assert changed == _at(2)
    assert accounts.sign_in("cid", PASSWORD, CLIENT, now=_at(3)).reason == "wrong password"
    assert accounts.sign_in("cid", "violet tram quarry", CLIENT, now=_at(4)).ok
    # a session signed in before the change ends at its next interaction; the one that changed it goes on
    ended = accounts.check_session(cid, _at(-60), _at(1), now=_at(5))
    assert ended.user is None and "sign in again" in ended.message
    assert accounts.check_session(cid, changed, _at(4), now=_at(5)).user.username == "cid"
    assert [d["reason"] for _, _, d in _events("session_ended")] == ["credentials changed"]


def test_reset_password_makes_the_user_choose_their_own(users):
    temporary = accounts.reset_password("ben", actor_id=users["ana"], now=_at(0))
    assert len(temporary) >= accounts.MIN_PASSWORD_LENGTH and not accounts.password_problems(temporary, "ben")
    assert accounts.check_session(users["ben"], _at(-1), _at(-1), now=_at(1)).user is None
    signed = accounts.sign_in("ben", temporary, CLIENT, now=_at(2))
    assert signed.ok and signed.user.must_change_password
    accounts.change_password(users["ben"], temporary, "violet tram quarry", client=CLIENT, now=_at(3))
    assert not accounts.sign_in("ben", "violet tram quarry", CLIENT, now=_at(4)).user.must_change_password
    with pytest.raises(PolicyError, match="published demo password"):
        accounts.reset_password("ben", password="demo-clinician")
    assert accounts.reset_password("ben", password="given by the pi 7") == "given by the pi 7"
    assert [d for _, _, d in _events("password_reset")] == [
        {"target": "ben", "via": "app"},
        {"target": "ben", "via": "cli"},
    ]


def test_deactivate_reactivate_and_role_changes_end_sessions_and_keep_one_pi(users):
    ana, ben = users["ana"], users["ben"]
    with pytest.raises(AccountError, match="last active principal investigator"):
        accounts.deactivate("ana", actor_id=ana)
    with pytest.raises(AccountError, match="last active principal investigator"):
        accounts.set_role("ana", "reader", actor_id=ana)
    assert accounts.set_role("ben", "pi", actor_id=ana, now=_at(0)).role == "pi"
    assert accounts.check_session(ben, _at(-5), _at(-5), now=_at(1)).user is None  # re-roled: signs in again
    assert accounts.set_role("ana", "reader", now=_at(2)).role == "reader"  # now ben is a PI as well
    with pytest.raises(AccountError, match="last active principal investigator"):
        accounts.deactivate("ben")
    assert not accounts.deactivate("cid", actor_id=ben, now=_at(3)).active
    cid_session = accounts.check_session(users["cid"], _at(2.5), _at(2.5), now=_at(4))
    assert cid_session.user is None and "deactivated" in cid_session.message
    assert accounts.sign_in("cid", PASSWORD, CLIENT, now=_at(5)).reason == "inactive account"
    with pytest.raises(AccountError, match="inactive already"):
        accounts.deactivate("cid")
    assert accounts.activate("cid", actor_id=ben).active
    assert accounts.sign_in("cid", PASSWORD, CLIENT, now=_at(6)).ok
    with pytest.raises(AccountError, match="no account named"):
        accounts.deactivate("zed")
    actions = [a for a, _, _ in _events()]
    assert [a for a in actions if a.startswith("user_")] == [
        "user_role_changed",
        "user_role_changed",
        "user_deactivated",
        "user_activated",
    ]
    assert _events("user_role_changed")[0][2] == {"target": "ben", "old_role": "clinician", "role": "pi", "via": "app"}


def test_imported_readers_cannot_be_managed_or_sign_in(users):
    with session_scope() as s:
        repo.add_inactive_reader(s, "paper-reader", "Paper reader", "imported")
    with pytest.raises(AccountError, match="never signs in"):
        accounts.activate("paper-reader")
    assert accounts.sign_in("paper-reader", "", CLIENT).reason == "inactive account"


def test_published_demo_passwords_work_only_in_a_demo_workspace(users, workspace):
    with session_scope() as s:
        repo.create_user(s, "reader", "demo-reader", "reader")
    refused = accounts.sign_in("reader", "demo-reader", CLIENT, now=_at(0))
    assert refused.reason == "published demo password outside a demo workspace"
    assert "published demo password" in refused.message and "reset your password" in refused.message
    (workspace / ".demo-complete").write_text("built\n")
    assert accounts.sign_in("reader", "demo-reader", CLIENT, now=_at(10)).ok
    (workspace / ".demo-complete").unlink()
    temporary = accounts.reset_password("reader", actor_id=users["ana"])
    assert accounts.sign_in("reader", temporary, CLIENT, now=_at(20)).ok  # reset: an ordinary account again


def test_idle_sessions_end_after_the_configured_minutes(users, monkeypatch):
    ana = users["ana"]
    assert accounts.check_session(ana, _at(0), _at(0), now=_at(29 * 60)).user is not None
    idle = accounts.check_session(ana, _at(0), _at(0), now=_at(31 * 60))
    assert idle.user is None and idle.message.startswith("You were signed out after 30 minutes without activity")
    assert _events("sign_out")[-1][2] == {"reason": "idle"}
    monkeypatch.setenv("IOAI_IDLE_MINUTES", "2")
    assert accounts.check_session(ana, _at(0), _at(0), now=_at(3 * 60)).user is None
    monkeypatch.setenv("IOAI_IDLE_MINUTES", "soon")
    with pytest.raises(ValueError, match="IOAI_IDLE_MINUTES"):
        accounts.idle_timeout()
    assert accounts.check_session(99999, _at(0), _at(0), now=_at(1)) == accounts.SessionCheck(None, "")


class FakeUser(Mapping):
    """What ``st.user`` looks like after ``st.login``: a read-only mapping of the identity token's claims."""

    def __init__(self, **claims) -> None:
        self._claims = {"is_logged_in": True, **claims}

    def __getitem__(self, key):
        return self._claims[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._claims)

    def __len__(self) -> int:
        return len(self._claims)


def test_an_identity_maps_to_the_active_account_named_by_its_claim(users):
    with session_scope() as s:
        repo.create_user(s, "eva@hospital.org", "unused-password-1", "reader")
    ok = accounts.sign_in_identity(
        FakeUser(email="Eva@Hospital.org", email_verified=True), client=CLIENT, provider="https://idp"
    )
    assert ok.ok and ok.user.username == "eva@hospital.org"
    assert _events("sign_in")[-1][2] == {"client": CLIENT, "method": "https://idp"}
    unknown = accounts.sign_in_identity(FakeUser(email="mallory@evil.org"), client=CLIENT, provider="https://idp")
    assert unknown.reason == "unknown identity" and "mallory@evil.org" in unknown.message
    assert _events("sign_in_refused")[-1][1:] == (
        "mallory@evil.org",
        {"client": CLIENT, "method": "https://idp", "reason": "unknown identity"},
    )
    unverified = accounts.sign_in_identity(
        FakeUser(email="eva@hospital.org", email_verified=False), client=CLIENT, provider="x"
    )
    assert unverified.reason == "email not verified"
    assert accounts.sign_in_identity(FakeUser(name="Eva"), client=CLIENT, provider="x").reason == "no email claim"
    by_claim = accounts.sign_in_identity(
        FakeUser(preferred_username="cid", email="other@x.org"), client=CLIENT, provider="x", claim="preferred_username"
    )
    assert by_claim.ok and by_claim.user.username == "cid"
    accounts.deactivate("eva@hospital.org")
    gone = accounts.sign_in_identity(FakeUser(email="eva@hospital.org"), client=CLIENT, provider="x")
    assert gone.reason == "unknown identity"


def test_providers_are_read_from_the_auth_section(monkeypatch):
    shared = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "s"}
    assert accounts.oidc_providers(shared) == []
    assert accounts.oidc_providers({**shared, "client_id": "c", "client_secret": "x"}) == [(None, "single sign-on")]
    monkeypatch.setenv("IOAI_OIDC_LABEL", "Hospital account")
    named = {**shared, "microsoft": {"client_id": "c"}, "okta": {"client_id": "d"}, "client_kwargs": {"prompt": "x"}}
    assert accounts.oidc_providers(named) == [("microsoft", "Microsoft"), ("okta", "Okta")]
    assert accounts.oidc_claim() == "email"
    monkeypatch.setenv("IOAI_OIDC_CLAIM", "preferred_username")
    assert accounts.oidc_claim() == "preferred_username"


def test_the_same_rules_hold_on_postgresql(postgres_url, tmp_path, monkeypatch):
    from tests.postgres import reset_database

    reset_database(postgres_url)
    monkeypatch.setenv("IOAI_WORKSPACE", str(tmp_path))
    monkeypatch.setenv("IOAI_DATABASE_URL", postgres_url)
    init_db()
    ana = accounts.add_user("ana", PASSWORD, "pi").id
    accounts.add_user("cid", PASSWORD, "reader")
    t = _fail_until_locked("cid")
    assert accounts.sign_in("cid", PASSWORD, CLIENT, now=_at(t + 1)).reason == "account locked"
    assert accounts.list_accounts(now=_at(t + 1))[1].locked_until == _at(t) + ACCOUNT_THROTTLE.lockout
    assert accounts.unlock("cid", actor_id=ana, now=_at(t + 2))
    assert accounts.sign_in("cid", PASSWORD, CLIENT, now=_at(t + 3)).ok
    with pytest.raises(AccountError, match="last active principal investigator"):
        accounts.set_role("ana", "reader")
    changed = accounts.change_password(ana, PASSWORD, "violet tram quarry", client=CLIENT)
    assert accounts.check_session(ana, changed - timedelta(seconds=1), changed).user is None
    assert accounts.check_session(ana, changed, changed).user.username == "ana"

"""Accounts: password sign-in with throttling, the password policy, password changes, the principal investigator's
user administration, sign-in through an identity provider, and whether an open session may go on.

No Streamlit here: the app, the CLI and the tests call the same functions, and each function runs its own short
transactions (``read_scope`` to read, ``run_transaction`` to write), so callers never hold a database session.

**Throttling** is evaluated from the ``sign_in_attempts`` table, so it holds across server processes and restarts:

- per account, keyed by the name as typed (lower-cased) whether or not such an account exists, so a refusal says
  nothing about which names exist: after 2 failures in a row every further attempt waits 1, 2, 4 ... s (at most
  60 s) after the last failure, and 5 failures within 15 minutes lock the name for 15 minutes. A successful sign-in,
  or an unlock or password reset by a principal investigator, starts the count again.
- per client (the address the server saw, or the browser session where it saw none): the same backoff after 10
  failures within 15 minutes and a 15-minute lockout after 20, whatever names were tried; a success does not reset
  it (one valid account must not let a client go on guessing others).

During a backoff or a lockout the password is not checked at all, so even the right one is refused; those refusals
are audited but not counted. Every checked attempt is recorded and audited (``sign_in``, ``sign_in_failed``), and so
are lockouts (``sign_in_locked``), refusals (``sign_in_refused``) and unlocks (``sign_in_unlocked``: by a principal
investigator, or at the first attempt after a lockout ran out).

**Hashing outside transactions.** An Argon2id verify takes tens of milliseconds of CPU and 64 MiB: the account is
read in a short read transaction, the password verified with no transaction open, then the attempt and its audit
rows are written in one short write transaction, so simultaneous sign-ins never hold the write lock while hashing.

**Demo accounts.** The demo passwords are published (README, ``make run``). A published demo password is accepted
only in a demo workspace, complete or being built (``services.demo_accounts.demo_workspace``); anywhere else a
sign-in with one is refused, and the account works again once a principal investigator resets its password. No
password policy lets anyone set one.
"""

from __future__ import annotations

import math
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from db import repo
from db.audit import log_event, run_transaction
from db.models import ROLES, utcnow
from db.repo import UserInfo
from db.session import read_scope
from services.demo_accounts import DEMO_PASSWORDS, demo_workspace

__all__ = [
    "ACCOUNT_THROTTLE",
    "CLIENT_THROTTLE",
    "MAX_PASSWORD_LENGTH",
    "MIN_PASSWORD_LENGTH",
    "AccountError",
    "AccountRow",
    "PolicyError",
    "SessionCheck",
    "SignInResult",
    "Throttle",
    "activate",
    "add_user",
    "change_password",
    "check_password_policy",
    "check_session",
    "deactivate",
    "idle_timeout",
    "list_accounts",
    "oidc_claim",
    "oidc_providers",
    "password_problems",
    "reset_password",
    "set_role",
    "sign_in",
    "sign_in_identity",
    "sign_out",
    "temporary_password",
    "unlock",
]

MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 256
DEFAULT_IDLE_MINUTES = 30.0
_USERNAME = re.compile(r"[a-z0-9][a-z0-9._@+-]{1,63}")
# Bases of passwords that guessing lists try first; a password is refused when it is one of these once lower-cased
# and stripped of the digits and symbols people add around them ("Password2024!" -> "password").
_COMMON_BASES = frozenset(
    {
        "password",
        "passw0rd",
        "passwort",
        "motdepasse",
        "qwerty",
        "qwertyuiop",
        "qwertz",
        "azerty",
        "asdfghjkl",
        "1q2w3e4r5t",
        "1qaz2wsx",
        "1qaz2wsx3edc",
        "zaq12wsx",
        "abc",
        "abcdef",
        "abcdefgh",
        "abcdefghij",
        "letmein",
        "welcome",
        "iloveyou",
        "admin",
        "administrator",
        "changeme",
        "secret",
        "trustno",
        "monkey",
        "dragon",
        "football",
        "baseball",
        "sunshine",
        "princess",
        "superman",
        "starwars",
        "master",
        "login",
        "hospital",
        "surgery",
        "neurosurgery",
        "doctor",
        "reader",
        "clinician",
        "study",
        "demo",
    }
)
_AROUND = re.compile(r"^[\W\d_]+|[\W\d_]+$")


class AccountError(ValueError):
    """A refused account action; the message says why and what to do."""


class PolicyError(AccountError):
    """A password the policy refuses; ``problems`` lists every reason."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("Password not accepted: " + "; ".join(self.problems) + ".")


@dataclass(frozen=True)
class Throttle:
    """Backoff and lockout for one kind of key (an account name or a client)."""

    backoff_after: int  # failures in a row before the first wait
    lock_after: int  # failures within `window` that lock the key
    window: timedelta
    lockout: timedelta
    first_wait_s: float = 1.0
    max_wait_s: float = 60.0

    def wait_after(self, failures: int) -> timedelta:
        """How long after the last of ``failures`` counted failures the next attempt has to wait."""
        if failures < self.backoff_after:
            return timedelta(0)
        return timedelta(seconds=min(self.first_wait_s * 2 ** (failures - self.backoff_after), self.max_wait_s))


ACCOUNT_THROTTLE = Throttle(backoff_after=2, lock_after=5, window=timedelta(minutes=15), lockout=timedelta(minutes=15))
CLIENT_THROTTLE = Throttle(backoff_after=10, lock_after=20, window=timedelta(minutes=15), lockout=timedelta(minutes=15))


@dataclass(frozen=True)
class _Gate:
    """Where one key stands now."""

    failures: int  # failures that count now (since the last success or lockout, within the window)
    locked_until: datetime | None  # the end of the latest lockout, in force or over
    retry_at: datetime | None  # no attempt before this moment (a backoff or a lockout in force); None: go ahead
    lock_ran_out: bool  # a lockout ended and no attempt was recorded since: this attempt is the first after it

    @property
    def locked(self) -> bool:
        return self.retry_at is not None and self.retry_at == self.locked_until


def _gate(attempts: Sequence[tuple[datetime, bool]], policy: Throttle, now: datetime, *, success_resets: bool) -> _Gate:
    """Replay the recorded attempts (oldest first, up to ``now``) through ``policy``."""
    attempts = [(at, success) for at, success in attempts if at <= now]
    counted: list[datetime] = []
    locked_until: datetime | None = None
    for at, success in attempts:
        if success:
            if success_resets:
                counted, locked_until = [], None
            continue
        if locked_until is not None and at < locked_until:
            continue  # recorded by a sign-in that raced the lockout: it does not extend it
        counted = [t for t in counted if t > at - policy.window] + [at]
        if len(counted) >= policy.lock_after:
            locked_until, counted = at + policy.lockout, []
    counted = [t for t in counted if t > now - policy.window]
    retry_at: datetime | None = None
    if locked_until is not None and now < locked_until:
        retry_at = locked_until
    elif counted and policy.wait_after(len(counted)) and counted[-1] + policy.wait_after(len(counted)) > now:
        retry_at = counted[-1] + policy.wait_after(len(counted))
    ran_out = locked_until is not None and now >= locked_until and not any(at >= locked_until for at, _ in attempts)
    return _Gate(len(counted), locked_until, retry_at, ran_out)


def _history(policy: Throttle, now: datetime) -> datetime:
    return now - 2 * (policy.window + policy.lockout)


def _gates(session: Session, name: str, client: str, now: datetime) -> tuple[_Gate, _Gate]:
    """The account name's and the client's gates."""
    by_name = repo.sign_in_attempts(session, since=_history(ACCOUNT_THROTTLE, now), username=name)
    by_client = repo.sign_in_attempts(session, since=_history(CLIENT_THROTTLE, now), client=client)
    return (
        _gate(by_name, ACCOUNT_THROTTLE, now, success_resets=True),
        _gate(by_client, CLIENT_THROTTLE, now, success_resets=False),
    )


def _when(moment: datetime, now: datetime) -> str:
    minutes = max(1, math.ceil((moment - now).total_seconds() / 60))
    return f"{moment:%H:%M} UTC (in {minutes} min)"


def _refusal(account: _Gate, client: _Gate, now: datetime) -> tuple[str, datetime, str] | None:
    """(reason, retry at, message) when the gates refuse an attempt now, else None."""
    if account.locked and account.retry_at is not None:
        return (
            "account locked",
            account.retry_at,
            f"Sign-in for this username is locked after {ACCOUNT_THROTTLE.lock_after} failed attempts, even with the "
            f"right password, until {_when(account.retry_at, now)}. Try again then, or ask your principal "
            "investigator to unlock the account (Users page).",
        )
    if client.locked and client.retry_at is not None:
        return (
            "client locked",
            client.retry_at,
            f"Too many failed sign-ins from this computer: sign-in from here is paused until "
            f"{_when(client.retry_at, now)}. Try again then; if that was not you, tell your principal investigator.",
        )
    retry_at = max((g.retry_at for g in (account, client) if g.retry_at is not None), default=None)
    if retry_at is None:
        return None
    seconds = math.ceil((retry_at - now).total_seconds())
    return "backoff", retry_at, f"Too many failed attempts: wait {seconds} s, then try again."


@dataclass(frozen=True)
class SignInResult:
    user: UserInfo | None  # the signed-in account; None when refused
    message: str  # why it was refused and what to do ("" when signed in); plain text, not markdown
    at: datetime  # the moment of the attempt: the session's sign-in time
    reason: str = ""  # why it was refused, for the audit log and tests

    @property
    def ok(self) -> bool:
        return self.user is not None


_WRONG = "Unknown username or wrong password. Check both and try again."
_DEMO = (
    "That is a published demo password: it works only in the demo workspace, not here. Ask your principal "
    "investigator to reset your password."
)


def _log_unlocks(session: Session, name: str, client: str, account: _Gate, by_client: _Gate) -> None:
    """Audit a lockout that ran out, once: at the first attempt after it."""
    if account.lock_ran_out and account.locked_until is not None:
        log_event(session, "sign_in_unlocked", username=name, scope="account", why="lockout ran out")
    if by_client.lock_ran_out and by_client.locked_until is not None:
        log_event(session, "sign_in_unlocked", username=name, scope="client", client=client, why="lockout ran out")


def sign_in(username: str, password: str, client: str, *, now: datetime | None = None) -> SignInResult:
    """Check a password sign-in, throttled per account name and per ``client``, and record and audit it."""
    now = now or utcnow()
    typed = username.strip()
    name = typed.lower()[:64]
    with read_scope() as session:
        found = repo.find_credentials(session, typed) if typed else None
        account, by_client = _gates(session, name, client, now)
    refused = _refusal(account, by_client, now)
    if refused is not None:
        reason, retry_at, message = refused
        detail = {"client": client, "reason": reason, "retry_at": str(retry_at)}
        run_transaction(lambda s: log_event(s, "sign_in_refused", username=name, **detail))
        return SignInResult(None, message, now, reason)
    usable = found is not None and found.user.active
    verified = repo.verify_password(found.password_hash if found is not None and usable else None, password)
    demo_refused = verified and password in DEMO_PASSWORDS and not demo_workspace()

    def record(session: Session) -> SignInResult:
        account, by_client = _gates(session, name, client, now)  # a concurrent attempt may have locked it meanwhile
        refused = _refusal(account, by_client, now)
        if refused is not None:
            reason, retry_at, message = refused
            log_event(session, "sign_in_refused", username=name, client=client, reason=reason, retry_at=str(retry_at))
            return SignInResult(None, message, now, reason)
        _log_unlocks(session, name, client, account, by_client)
        current = repo.find_credentials(session, typed) if found is not None else None
        unchanged = current is not None and found is not None and current.password_hash == found.password_hash
        success = verified and unchanged and current is not None and current.user.active and not demo_refused
        repo.add_sign_in_attempt(session, name, client, success, now)
        if success and current is not None and found is not None:
            repo.rehash_password(session, current.user.id, found.password_hash, password)
            log_event(session, "sign_in", user_id=current.user.id, username=current.user.username, client=client)
            return SignInResult(current.user, "", now)
        if demo_refused:
            reason = "published demo password outside a demo workspace"
        elif found is None:
            reason = "unknown username"
        elif not usable:
            reason = "inactive account"
        else:
            reason = "wrong password"
        log_event(session, "sign_in_failed", username=name, client=client, reason=reason)
        after, after_client = _gates(session, name, client, now)
        for scope, gate, before in (("account", after, account), ("client", after_client, by_client)):
            if gate.locked and not before.locked:
                log_event(
                    session, "sign_in_locked", username=name, scope=scope, client=client, until=str(gate.retry_at)
                )
        locked = _refusal(after, after_client, now)
        if demo_refused:
            message = _DEMO
        elif locked is not None and locked[0] != "backoff":
            message = locked[2]
        else:
            message = _WRONG
            left = ACCOUNT_THROTTLE.lock_after - after.failures
            if after.failures >= ACCOUNT_THROTTLE.backoff_after and left > 0:
                lockout = int(ACCOUNT_THROTTLE.lockout.total_seconds() // 60)
                message += (
                    f" {left} more failed attempt{'s lock' if left > 1 else ' locks'} this username for {lockout} min."
                )
        return SignInResult(None, message, now, reason)

    return run_transaction(record)


def sign_in_identity(
    claims: Mapping[str, Any], *, client: str, provider: str, claim: str = "email", now: datetime | None = None
) -> SignInResult:
    """Sign in someone an OpenID Connect identity provider vouched for (``claims``: ``st.user``'s attributes) as
    the active local account whose username is the ``claim`` (lower-cased). Unknown identities are refused and
    audited; a password lockout does not apply (no password is involved)."""
    now = now or utcnow()
    value = claims.get(claim)
    identity = value.strip().lower()[:64] if isinstance(value, str) else ""
    found = None
    if not identity:
        reason = f"no {claim} claim"
        message = f"The identity provider sent no {claim}. Ask your administrator to check the sign-in configuration."
    elif claim == "email" and claims.get("email_verified") is False:
        reason = "email not verified"
        message = "The identity provider has not verified this e-mail address, so it cannot sign you in here."
    else:
        with read_scope() as session:
            found = repo.find_credentials(session, identity)
        reason = "unknown identity"
        message = (
            f"No active account here matches {claim} {identity}. Ask your principal investigator to add one with "
            "that username."
        )
        if found is not None and not (found.user.active and found.user.can_sign_in):
            found = None

    def record(session: Session) -> SignInResult:
        user = repo.get_user(session, found.user.id) if found is not None else None
        if user is not None and user.can_sign_in:
            repo.add_sign_in_attempt(session, identity, client, True, now)
            log_event(session, "sign_in", user_id=user.id, username=user.username, client=client, method=provider)
            return SignInResult(user, "", now)
        log_event(session, "sign_in_refused", username=identity or None, client=client, method=provider, reason=reason)
        return SignInResult(None, message, now, reason)

    return run_transaction(record)


def sign_out(user_id: int, *, reason: str = "signed out") -> None:
    """Audit the end of a session (the caller forgets it)."""
    run_transaction(lambda s: log_event(s, "sign_out", user_id=user_id, reason=reason))


# ------------------------------------------------------------------------------------------------ sessions


@dataclass(frozen=True)
class SessionCheck:
    user: UserInfo | None  # the account, fresh from the database; None: the session has ended
    message: str  # why it ended ("" when it goes on, or when there was no such account)


def idle_timeout() -> timedelta:
    """How long a session may go without an interaction (``IOAI_IDLE_MINUTES``, default 30)."""
    text = os.environ.get("IOAI_IDLE_MINUTES", "").strip()
    try:
        minutes = float(text) if text else DEFAULT_IDLE_MINUTES
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise ValueError(f"IOAI_IDLE_MINUTES={text!r}: give a positive number of minutes")
    return timedelta(minutes=minutes)


def check_session(
    user_id: int, signed_in_at: datetime, last_seen: datetime, *, now: datetime | None = None
) -> SessionCheck:
    """Whether a session signed in at ``signed_in_at`` and last used at ``last_seen`` may go on: the account is
    still active, its password, role and access have not changed since the sign-in, and the session was not idle for
    longer than :func:`idle_timeout`. An ended session is audited."""
    now = now or utcnow()
    with read_scope() as session:
        user = repo.get_user(session, user_id, active_only=False)
    if user is None:
        return SessionCheck(None, "")
    if not user.active:
        reason, message = "account deactivated", "Your account has been deactivated: ask your principal investigator."
    elif user.credentials_changed_at is not None and signed_in_at < user.credentials_changed_at:
        reason = "credentials changed"
        message = "Your password, role or access changed since you signed in. Please sign in again."
    elif now - last_seen > idle_timeout():
        minutes = round(idle_timeout().total_seconds() / 60)
        reason = "idle"
        message = f"You were signed out after {minutes} minutes without activity. Sign in again to go on."
    else:
        return SessionCheck(user, "")
    action = "sign_out" if reason == "idle" else "session_ended"
    run_transaction(lambda s: log_event(s, action, user_id=user.id, reason=reason))
    return SessionCheck(None, message)


# ------------------------------------------------------------------------------------------------ passwords


def password_problems(password: str, username: str = "") -> list[str]:
    """Everything the minimum policy finds wrong with ``password`` for the account ``username`` (empty: fine)."""
    problems = []
    if len(password) < MIN_PASSWORD_LENGTH:
        problems.append(f"it has {len(password)} characters, at least {MIN_PASSWORD_LENGTH} are needed")
    if len(password) > MAX_PASSWORD_LENGTH:
        problems.append(f"it has {len(password)} characters, at most {MAX_PASSWORD_LENGTH} are allowed")
    lowered, name = password.lower(), username.strip().lower()
    if name and (lowered == name or (len(name) >= 4 and name in lowered)):
        problems.append("it contains the username")
    if password in DEMO_PASSWORDS:
        problems.append("it is a published demo password")
    elif _AROUND.sub("", lowered) in _COMMON_BASES or lowered.isdigit():
        problems.append("it is a common password (or one with digits or symbols added)")
    if password and len(set(password)) < 4:
        problems.append("it uses fewer than 4 different characters")
    return problems


def check_password_policy(password: str, username: str = "") -> None:
    """Raise :class:`PolicyError` naming every problem when the policy refuses ``password``."""
    problems = password_problems(password, username)
    if problems:
        raise PolicyError(problems)


def temporary_password(username: str) -> str:
    """A random password (96 bits) that passes the policy, for an account that must then set its own."""
    while True:
        candidate = secrets.token_urlsafe(12)  # 16 characters, 96 random bits
        if not password_problems(candidate, username):
            return candidate


def change_password(
    user_id: int, current: str, new: str, *, client: str, repeat: str | None = None, now: datetime | None = None
) -> datetime:
    """Change the signed-in account's own password (the current one is required). Returns the moment of the change:
    the caller's session counts as signed in then, every other session of the account ends. A wrong current
    password counts as a failed sign-in attempt."""
    now = now or utcnow()
    with read_scope() as session:
        user = repo.get_user(session, user_id)
        found = repo.find_credentials(session, user.username) if user is not None else None
        account = _gates(session, user.username, client, now)[0] if user is not None else None
    if user is None or found is None or account is None:
        raise AccountError("Your account is no longer active.")
    if account.locked and account.retry_at is not None:
        raise AccountError(
            f"This account is locked after too many failed attempts until {_when(account.retry_at, now)}."
        )
    if repeat is not None and repeat != new:
        raise AccountError("The new password and its repetition differ: type the same password twice.")
    problems = password_problems(new, user.username)
    if new == current:
        problems.append("it is the current password")
    if problems:
        raise PolicyError(problems)
    if not repo.verify_password(found.password_hash, current):
        name = user.username.lower()

        def failed(session: Session) -> None:
            repo.add_sign_in_attempt(session, name, client, False, now)
            log_event(session, "password_change_failed", user_id=user_id, reason="wrong current password")
            after = _gates(session, name, client, now)[0]
            if after.locked:
                log_event(session, "sign_in_locked", username=name, scope="account", until=str(after.retry_at))

        run_transaction(failed)
        raise AccountError("The current password is wrong: type the password you signed in with.")
    new_hash = repo.hash_password(new)

    def store(session: Session) -> None:
        again = repo.find_credentials(session, user.username)
        if again is None or again.password_hash != found.password_hash or not again.user.active:
            raise AccountError("The account changed meanwhile: sign in again and retry.")
        repo.set_password(session, user_id, new_hash, must_change=False, changed_at=now)
        log_event(session, "password_changed", user_id=user_id, username=user.username)

    run_transaction(store)
    return now


# ------------------------------------------------------------------------------------------- administration


@dataclass(frozen=True)
class AccountRow:
    """One account as the PI's Users page and ``users list`` show it."""

    user: UserInfo
    locked_until: datetime | None  # sign-in for this name is locked until then


def list_accounts(*, now: datetime | None = None) -> list[AccountRow]:
    """Every account, by username, with its sign-in lockout if one is in force."""
    now = now or utcnow()
    rows = []
    with read_scope() as session:
        for user in repo.list_users(session):
            attempts = repo.sign_in_attempts(session, since=_history(ACCOUNT_THROTTLE, now), username=user.username)
            gate = _gate(attempts, ACCOUNT_THROTTLE, now, success_resets=True)
            rows.append(AccountRow(user, gate.retry_at if gate.locked else None))
    return rows


def _actor(session: Session, actor_id: int | None) -> dict[str, Any]:
    """Audit fields for who acts: a principal investigator (checked again here), or the command line (None)."""
    if actor_id is None:
        return {"user_id": None, "via": "cli"}
    actor = repo.get_user(session, actor_id)
    if actor is None or actor.role != "pi":
        raise AccountError("Only an active principal investigator may manage accounts.")
    return {"user_id": actor.id, "via": "app"}


def _target(session: Session, username: str) -> UserInfo:
    found = repo.find_credentials(session, username.strip())
    if found is None:
        raise AccountError(f"There is no account named {username.strip()!r}.")
    if not found.user.can_sign_in:
        raise AccountError(
            f"{found.user.username} holds imported or simulated reads and never signs in; it cannot be changed here."
        )
    return found.user


def _keep_a_pi(session: Session, target: UserInfo, doing: str) -> None:
    """The last active principal investigator may not be deactivated or demoted (nobody could manage accounts)."""
    if target.role == "pi" and target.active and repo.active_pi_ids(session) == [target.id]:
        raise AccountError(
            f"Cannot {doing} {target.username}: it is the last active principal investigator. Give another account "
            "the pi role first."
        )


def add_user(
    username: str,
    password: str,
    role: str,
    display_name: str = "",
    *,
    actor_id: int | None = None,
    must_change_password: bool = False,
) -> UserInfo:
    """Add an account after checking the username and the password policy."""
    username = username.strip()
    if not _USERNAME.fullmatch(username):
        raise AccountError(
            f"Username {username!r} is not accepted: use 2 to 64 lower-case letters, digits and . _ @ + -, starting "
            "with a letter or a digit (an e-mail address works)."
        )
    if role not in ROLES:
        raise AccountError(f"Unknown role {role!r}: use one of {', '.join(ROLES)}.")
    check_password_policy(password, username)
    display_name = display_name.strip()[:128]

    def work(session: Session) -> UserInfo:
        actor = _actor(session, actor_id)
        if repo.find_credentials(session, username) is not None:
            raise AccountError(f"An account named {username} exists already.")
        user = repo.create_user(
            session, username, password, role, display_name, must_change_password=must_change_password
        )
        log_event(session, "user_added", target=username, role=role, **actor)
        return user

    return run_transaction(work)


def deactivate(username: str, *, actor_id: int | None = None, now: datetime | None = None) -> UserInfo:
    """Stop an account from signing in; its open sessions end at their next interaction."""
    now = now or utcnow()

    def work(session: Session) -> UserInfo:
        actor = _actor(session, actor_id)
        target = _target(session, username)
        if not target.active:
            raise AccountError(f"{target.username} is inactive already.")
        _keep_a_pi(session, target, "deactivate")
        repo.set_user_active(session, target.id, False, changed_at=now)
        log_event(session, "user_deactivated", target=target.username, **actor)
        return repo.get_user(session, target.id, active_only=False) or target

    return run_transaction(work)


def activate(username: str, *, actor_id: int | None = None) -> UserInfo:
    """Let a deactivated account sign in again."""

    def work(session: Session) -> UserInfo:
        actor = _actor(session, actor_id)
        target = _target(session, username)
        if target.active:
            raise AccountError(f"{target.username} is active already.")
        repo.set_user_active(session, target.id, True, changed_at=None)
        log_event(session, "user_activated", target=target.username, **actor)
        return repo.get_user(session, target.id) or target

    return run_transaction(work)


def set_role(username: str, role: str, *, actor_id: int | None = None, now: datetime | None = None) -> UserInfo:
    """Give an account another role; its open sessions end at their next interaction."""
    now = now or utcnow()
    if role not in ROLES:
        raise AccountError(f"Unknown role {role!r}: use one of {', '.join(ROLES)}.")

    def work(session: Session) -> UserInfo:
        actor = _actor(session, actor_id)
        target = _target(session, username)
        if target.role == role:
            raise AccountError(f"{target.username} has the {role} role already.")
        _keep_a_pi(session, target, "demote")
        repo.set_user_role(session, target.id, role, changed_at=now)
        log_event(session, "user_role_changed", target=target.username, old_role=target.role, role=role, **actor)
        return repo.get_user(session, target.id, active_only=False) or target

    return run_transaction(work)


def reset_password(
    username: str, *, actor_id: int | None = None, password: str | None = None, now: datetime | None = None
) -> str:
    """Give an account a temporary password (``password``, policy-checked, or a random one) that must be changed at
    the next sign-in; its open sessions end and a sign-in lockout is lifted. Returns the temporary password, which
    is shown once and stored only as a hash."""
    now = now or utcnow()
    name = username.strip()
    temporary = password if password is not None else temporary_password(name)
    check_password_policy(temporary, name)
    new_hash = repo.hash_password(temporary)

    def work(session: Session) -> None:
        actor = _actor(session, actor_id)
        target = _target(session, name)
        was_locked = _gate(
            repo.sign_in_attempts(session, since=_history(ACCOUNT_THROTTLE, now), username=target.username),
            ACCOUNT_THROTTLE,
            now,
            success_resets=True,
        ).locked
        repo.set_password(session, target.id, new_hash, must_change=True, changed_at=now)
        repo.add_sign_in_attempt(session, target.username, _unlock_client(actor_id), True, now)
        log_event(session, "password_reset", target=target.username, **actor)
        if was_locked:
            log_event(session, "sign_in_unlocked", username=target.username, scope="account", why="password reset")

    run_transaction(work)
    return temporary


def _unlock_client(actor_id: int | None) -> str:
    # An unlock is recorded as a successful attempt (which resets the name's failure count) from this pseudo-client.
    return f"unlock by {'cli' if actor_id is None else f'user {actor_id}'}"


def unlock(username: str, *, actor_id: int | None = None, now: datetime | None = None) -> bool:
    """Lift the sign-in lockout (and backoff) of an account name; returns whether it was locked."""
    now = now or utcnow()

    def work(session: Session) -> bool:
        actor = _actor(session, actor_id)
        target = _target(session, username)
        attempts = repo.sign_in_attempts(session, since=_history(ACCOUNT_THROTTLE, now), username=target.username)
        gate = _gate(attempts, ACCOUNT_THROTTLE, now, success_resets=True)
        repo.add_sign_in_attempt(session, target.username, _unlock_client(actor_id), True, now)
        log_event(session, "sign_in_unlocked", username=target.username, scope="account", why="unlocked", **actor)
        return gate.locked

    return run_transaction(work)


# ------------------------------------------------------------------------------------------------ OIDC


def oidc_claim() -> str:
    """The identity-token claim that names the local account (``IOAI_OIDC_CLAIM``, default ``email``)."""
    return os.environ.get("IOAI_OIDC_CLAIM", "").strip() or "email"


def oidc_providers(auth: Mapping[str, Any]) -> list[tuple[str | None, str]]:
    """(``st.login`` argument, button label) for each provider in the ``[auth]`` section of ``secrets.toml``: the
    unnamed provider (its settings directly in ``[auth]``) and every ``[auth.NAME]`` table."""
    providers: list[tuple[str | None, str]] = []
    if "client_id" in auth:
        providers.append((None, os.environ.get("IOAI_OIDC_LABEL", "").strip() or "single sign-on"))
    for name, value in auth.items():
        if isinstance(value, Mapping) and "client_id" in value:
            providers.append((name, name.replace("-", " ").title()))
    return providers
